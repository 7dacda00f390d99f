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

Strict fit (what ``--eval-only``, ``train.init_checkpoint``, resuming and the demo all go through):
a model checkpoint must have exactly the model's keys and shapes, and an ImageNet backbone file
(all keys under ``backbone.``) must cover and fit the model's backbone (the rest of the model keeps
its initialization, as always). Otherwise ONE ``CheckpointError`` lists every missing, unexpected
and mis-shaped key with the likely cause and the fix; nothing is loaded. Files matched by name
heuristics (Caffe2 ``.pkl``, ``?matching_heuristics=True``) keep Detectron2's matching.

Fine-tuning on a dataset with another number of classes: append ``?reinit_class_head=True`` to the
path (``train.init_checkpoint=model.pth?reinit_class_head=True``); the class-logit layers whose
shape differs then keep their fresh initialization, everything else must still fit.
"""
import logging
from typing import Optional
from urllib.parse import parse_qs, urlencode

from detectron2.checkpoint import DetectionCheckpointer

from ..user_errors import file_problem
from .backbone_names import convert_torchvision_resnet, is_torchvision_resnet_state_dict
from .convert import detect_layout
from .deformable_convert import detect_deformable_source
from .fit_check import REINIT_CLASS_HEAD, class_head_keys, compare_state_dicts, explain_misfit
from .safe_load import CheckpointError, load_pickle_file, load_torch_file

logger = logging.getLogger(__name__)

__all__ = ["DABDETRCheckpointer", "load_command_line_weights"]


class DABDETRCheckpointer(DetectionCheckpointer):
    """Drop-in replacement of ``DetectionCheckpointer`` (same constructor and ``load``/``save``)."""

    def load(self, path, *args, **kwargs):
        local = str(path).split("?", 1)[0]  # a local file, less the ?reinit_class_head=... query
        problem = file_problem(local) if path and "://" not in str(path) else None
        if problem:
            raise CheckpointError(f"checkpoint {local} {problem}")
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = None

    def _take_own_query(self) -> bool:
        """Remove ``reinit_class_head`` from the path's query (Detectron2 refuses unknown ones)."""
        parsed = getattr(self, "_parsed_url_during_load", None)
        if parsed is None or not parsed.query:
            return False
        queries = parse_qs(parsed.query)
        value = queries.pop(REINIT_CLASS_HEAD, ["False"])
        if value not in (["True"], ["False"]):
            raise CheckpointError(f"{parsed.geturl()}: {REINIT_CLASS_HEAD} must be True or False, got {value}")
        self._parsed_url_during_load = parsed._replace(query=urlencode(queries, doseq=True))
        return value == ["True"]

    def _load_file(self, filename):
        self._reinit_class_head = self._take_own_query()
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
            deformable = detect_deformable_source(model)
            layout = deformable or detect_layout(model)
            if layout in ("original", "detrex", "hf", "mmdet"):
                raise CheckpointError(
                    f"{filename} is a DAB-DETR checkpoint of the {layout} layout: convert it first with\n"
                    f"  python tools/convert_checkpoint.py --source {layout} {filename} converted.pth\n"
                    f"and load converted.pth"
                )
        return loaded

    def _torch_load(self, f):
        return load_torch_file(f)

    def _load_model(self, checkpoint):
        if not checkpoint.get("matching_heuristics", False):
            self._check_fit(checkpoint["model"])
        return super()._load_model(checkpoint)

    def _check_fit(self, weights):
        """Raise one ``CheckpointError`` unless ``weights`` fit the model (see the module doc)."""
        if any(k.startswith("module.") for k in weights):  # DDP-saved names, stripped by fvcore
            weights.update({k[len("module."):]: weights.pop(k) for k in list(weights) if k.startswith("module.")})
        model_state = self.model.state_dict()
        report = compare_state_dicts(weights, model_state)
        if getattr(self, "_reinit_class_head", False):
            heads = [k for k in class_head_keys(k for k, _, _ in report.mismatched)]
            for k in heads:
                del weights[k]
            if heads:
                logger.info("%s=True: the class head starts fresh (%s)", REINIT_CLASS_HEAD, ", ".join(heads))
            report.mismatched = [m for m in report.mismatched if m[0] not in heads]
        if report:
            raise CheckpointError(explain_misfit(report, weights, model_state, getattr(self, "_loading", None) or "<checkpoint>",
                                                 type(self.model).__name__))


def load_command_line_weights(model, overrides) -> Optional[str]:
    """Load the weights that a ``train.init_checkpoint=PATH`` override among ``overrides`` names, if
    one does, into ``model`` (``DABDETRCheckpointer``); return PATH or None. For the tools whose
    numbers do not depend on the weights (FLOPs, timings): a checkpoint named on their command line
    is still loaded, so a missing or misfitting one is an error, while the config's own
    ``train.init_checkpoint`` (often ImageNet backbone weights behind a URL) is not fetched."""
    named = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].strip() == "train.init_checkpoint"]
    if not named or not named[-1]:
        return None
    DABDETRCheckpointer(model).load(named[-1])
    return named[-1]
