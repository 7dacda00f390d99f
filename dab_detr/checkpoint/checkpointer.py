"""A ``DetectionCheckpointer`` that reads files safely and also accepts ImageNet backbones in
torchvision's format.

What ``train.init_checkpoint`` may point at:

- a checkpoint of this project, or one written by ``tools/convert_checkpoint.py``;
- a torchvision ResNet ``.pth`` (``torchvision.models.resnet50(weights=...).state_dict()``, e.g.
  ``resnet50-0676ba61.pth``): renamed to ``backbone.*`` with Detectron2 names;
- Detectron2's ``R-50.pkl`` / ``R-101.pkl``: the torchvision-converted ones
  (``ImageNetPretrained/torchvision/R-50.pkl``, the same weights as above) or the MSRA Caffe2 ones
  (``ImageNetPretrained/MSRA/R-50.pkl``: note those were trained with the stride in the 1x1 conv,
  BGR input and unit std, which this project's R50 configs do not use). Both are matched to
  ``backbone.*`` by Detectron2's own name heuristics.

``.pkl`` files are read with a numpy-only unpickler, everything else with
``torch.load(weights_only=True)`` (see ``safe_load``). A checkpoint of another DAB-DETR
implementation is refused with the command that converts it.
"""
from detectron2.checkpoint import DetectionCheckpointer

from .backbone_names import convert_torchvision_resnet, is_torchvision_resnet_state_dict
from .convert import detect_layout
from .safe_load import CheckpointError, load_pickle_file, load_torch_file

__all__ = ["DABDETRCheckpointer"]


class DABDETRCheckpointer(DetectionCheckpointer):
    """Drop-in replacement of ``DetectionCheckpointer`` (same constructor and ``load``/``save``)."""

    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            data = load_pickle_file(filename)
            if not isinstance(data, dict):
                raise CheckpointError(f"{filename}: expected a dict of weights, got {type(data).__name__}")
            if "model" in data and "__author__" in data:  # Detectron2 model-zoo format
                model = data["model"]
                if is_torchvision_resnet_state_dict(model):  # torchvision names inside a .pkl
                    data = dict(data, model=convert_torchvision_resnet(model, prefix="backbone."),
                                matching_heuristics=False)
                return data
            # Caffe2 / Detectron1 format, exactly as DetectionCheckpointer reads it
            if "blobs" in data:
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):
            raise CheckpointError(f"{filename}: pycls .pyth checkpoints are not supported")
        loaded = super()._load_file(filename)  # URL query handling; reads via _torch_load below
        model = loaded.get("model")
        if isinstance(model, dict) and is_torchvision_resnet_state_dict(model):
            loaded["model"] = convert_torchvision_resnet(model, prefix="backbone.")
            loaded.setdefault("__author__", "torchvision")
        elif isinstance(model, dict):
            layout = detect_layout(model)
            if layout in ("original", "detrex", "hf"):
                raise CheckpointError(
                    f"{filename} is a DAB-DETR checkpoint of the {layout} layout: convert it first with\n"
                    f"  python tools/convert_checkpoint.py --source {layout} {filename} converted.pth\n"
                    f"and load converted.pth"
                )
        return loaded

    def _torch_load(self, f):
        return load_torch_file(f)
