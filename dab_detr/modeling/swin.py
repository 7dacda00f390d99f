"""Detectron2's Swin Transformer backbone with its ``size_divisibility`` working."""
from detectron2.modeling.backbone import swin

__all__ = ["SwinTransformer"]


class SwinTransformer(swin.SwinTransformer):
    """``detectron2.modeling.backbone.SwinTransformer``, unchanged except ``size_divisibility``.

    Detectron2's class stores the value as ``_size_devisibility`` (sic) but its property reads
    ``_size_divisibility``, so reading ``size_divisibility`` raises ``AttributeError``. A
    detector that batches images with ``ImageList.from_tensors(..., backbone.size_divisibility)``
    (as ``DABDETR`` does) needs it: padding to a multiple of the largest stride (32) keeps the
    padding mask aligned with the last feature map. Parameter names are those of Detectron2's.
    """

    @property
    def size_divisibility(self) -> int:
        return 32
