"""Which config evaluates a converted checkpoint, and the overrides it needs: everything the
checkpoint saves (queries, patterns, classes, DC5, image-PE temperature) is compared with what the
config builds, and every difference becomes a ``key=value`` override of the printed command."""
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List

from .layout import Variant

__all__ = ["EvalCommand", "suggest_config", "required_settings", "config_overrides", "eval_command"]


@dataclass
class EvalCommand:
    """``config`` plus ``overrides`` (``key=value``) reproduce the checkpoint's model."""

    config: str
    overrides: List[str] = field(default_factory=list)

    def command(self, checkpoint: str) -> str:
        parts = ["python tools/lazyconfig_train_net.py", f"--config-file {self.config}", "--eval-only",
                 f"train.init_checkpoint={checkpoint}"] + self.overrides
        return " ".join(parts)


def suggest_config(v: Variant, file_name: str = "") -> str:
    """The DAB-DETR config under ``configs/`` closest to variant ``v``. DC5 cannot be seen in the weights
    of the original and transformers files: it comes from the saved settings or, failing that, the
    file name."""
    if v.family == "mmdet":
        return "configs/dab_detr_r50_mmdet.py"
    if v.denoising:
        return _dn_config(v, file_name)
    if v.backbone == "Swin-T":
        return "configs/dab_detr_swin_t.py"
    dc5 = v.dilation if v.dilation is not None else bool(re.search(r"dc5", file_name, re.IGNORECASE))
    name = "dab_detr_" + v.backbone.lower()
    if dc5:
        name += "_dc5"
        # the plain DC5 model was trained with image-PE temperature 10, fixxy with 20
        temperature_20 = v.pe_temperature is not None and tuple(v.pe_temperature) == (20, 20)
        if v.num_patterns == 0 and (v.random_refpoints_xy or temperature_20 or "fixxy" in file_name.lower()):
            name += "_fixxy"
    if v.num_patterns:
        name += f"_{v.num_patterns}patterns"
    return f"configs/{name}.py"


def _dn_config(v: Variant, file_name: str) -> str:
    """The DN-DETR config closest to ``v``: dn_dab_detr_r50[_dc5][_3patterns] where it exists, else
    dn_dab_detr_r50 (the overrides carry depth, DC5 and patterns)."""
    dc5 = v.dilation if v.dilation is not None else bool(re.search(r"dc5", file_name, re.IGNORECASE))
    name = "dn_dab_detr_r50" + ("_dc5" if dc5 else "") + (f"_{v.num_patterns}patterns" if v.num_patterns else "")
    from ..model_zoo import available_configs

    if v.backbone != "R50" or name + ".py" not in available_configs():
        name = "dn_dab_detr_r50"
    return f"configs/{name}.py"


def required_settings(v: Variant) -> Dict[str, Any]:
    """Config key -> the value the checkpoint's model needs (only what the checkpoint tells)."""
    s: Dict[str, Any] = {"model.num_queries": v.num_queries, "model.num_classes": v.num_classes}
    s["model.num_patterns" if v.family == "deformable" else "model.transformer.num_patterns"] = v.num_patterns
    resnet = v.backbone.startswith(("R50", "R101"))
    if resnet:
        s["model.backbone.stages.depth"] = 101 if v.backbone.startswith("R101") else 50
        if v.dilation is not None:
            s["model.backbone.stages.res5_dilation"] = 2 if v.dilation else 1
    if v.pe_temperature is not None and v.family != "deformable":  # deformable ignores it (SPEC-deformable)
        s["model.position_embedding.temperature_h"] = v.pe_temperature[0]
        s["model.position_embedding.temperature_w"] = v.pe_temperature[1]
    return s


_DEFAULTS = {"model.backbone.stages.res5_dilation": 1}  # make_resnet_stages' default


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if part not in node:
            return _DEFAULTS.get(dotted)
        node = node[part]
    return node


def _literal(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return repr(value)


def config_overrides(config_file: str, settings: Dict[str, Any]) -> List[str]:
    """``key=value`` for every setting whose value differs from what ``config_file`` sets."""
    from detectron2.config import LazyConfig

    from ..model_zoo import get_config_file

    cfg = LazyConfig.load(get_config_file(config_file))
    return [f"{key}={_literal(value)}" for key, value in settings.items() if _get(cfg, key) != value]


def eval_command(v: Variant, file_name: str = "", config: str = "") -> EvalCommand:
    """The config (``config``, or the suggested one) and overrides that evaluate a checkpoint of
    variant ``v``."""
    config = config or suggest_config(v, file_name)
    return EvalCommand(config, config_overrides(config, required_settings(v)))
