"""The deployable program: one image in, the top-k detections out, everything in between inside.

:class:`DeploymentModel` wraps a trained ``DABDETR`` or ``DABDeformableDETR`` (any
:class:`~dab_detr.modeling.set_prediction_detector.SetPredictionDetector`) into a module whose forward is what an
exported file computes. It reproduces the detector's Detectron2 inference path for one image
without Detectron2 structures: normalization, zero padding to the backbone's size divisibility,
the padding mask, the network, the top-k over (query, class) pairs and the scaling of the boxes
to input pixels.
"""
from typing import Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..modeling.set_prediction_detector import SetPredictionDetector
from ..modeling.postprocess import select_top_k

__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "DeploymentModel", "NotExportableError"]

INPUT_NAMES = ("image",)
OUTPUT_NAMES = ("boxes", "scores", "labels")


class NotExportableError(ValueError):
    """The model (or one of its modules) cannot be turned into an exported program."""


class DeploymentModel(nn.Module):
    """``image`` [1, 3, H, W] float (0..255, the detector's ``input_format``) -> detections.

    Returns:
        boxes [K, 4] float (x0, y0, x1, y1) in input pixels (scaled, not clipped, as the
        detector's own inference); scores [K] float in (0, 1), sorted descending; labels [K]
        int64 contiguous class ids 0..C-1. K = min(select_box_nums_for_evaluation, Q * C), a
        constant of the program.

    H and W may be any size the backbone accepts: they stay symbolic in an exported program.
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        if not isinstance(detector, SetPredictionDetector):
            raise NotExportableError(
                f"cannot export a {type(detector).__name__}: only DAB-DETR and DAB-Deformable-DETR "
                f"detectors (subclasses of SetPredictionDetector) are supported"
            )
        constraints = getattr(detector.backbone, "padding_constraints", {}) or {}
        if constraints.get("square_size", 0):
            raise NotExportableError(
                f"cannot export: module 'backbone' ({type(detector.backbone).__name__}) asks for square "
                f"padding (padding_constraints square_size={constraints['square_size']}), which the "
                f"exported program does not implement"
            )
        self.detector = detector.eval()
        self.size_divisibility = int(detector.backbone.size_divisibility or 1)
        self.num_detections = detector.select_box_nums_for_evaluation  # clipped to Q * C by select_top_k

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        channels = self.detector.pixel_mean.shape[0]
        if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != channels:  # static sizes: no guard
            raise ValueError(f"DeploymentModel takes one image [1, {channels}, H, W], got {tuple(image.shape)}")
        height, width = image.shape[-2:]
        x = (image[0] - self.detector.pixel_mean) / self.detector.pixel_std
        # zero padding at the bottom and right to the size divisibility, as ImageList.from_tensors
        d = self.size_divisibility
        pad_h = (height + d - 1) // d * d - height
        pad_w = (width + d - 1) // d * d - width
        x = F.pad(x, (0, pad_w, 0, pad_h))[None]
        # [1, H', W'] True on the padding; built from index comparisons so that H and W stay symbolic
        rows = torch.arange(x.shape[-2], device=x.device)[:, None] >= height
        cols = torch.arange(x.shape[-1], device=x.device)[None, :] >= width
        padding_mask = (rows | cols)[None]
        outputs = self.detector.predict(x, padding_mask)
        scores, labels, boxes = select_top_k(outputs["pred_logits"], outputs["pred_boxes"], self.num_detections)
        boxes = boxes[0]
        # scaled by per-coordinate products with the symbolic sizes: nothing is fixed to the sample's
        boxes = torch.stack((boxes[:, 0] * width, boxes[:, 1] * height, boxes[:, 2] * width, boxes[:, 3] * height), 1)
        return boxes, scores[0], labels[0]
