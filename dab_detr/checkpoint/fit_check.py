"""Does a checkpoint's state dict fit a model? One error listing every missing, unexpected and
mis-shaped key, with the likely cause and the fix (a config override, the converter, the
class-head switch), instead of Detectron2's warnings and a half-loaded model."""
import re
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from .rename import fmt

__all__ = ["FitReport", "compare_state_dicts", "class_head_keys", "explain_misfit"]

# the query parameter of train.init_checkpoint that re-initializes the class head
REINIT_CLASS_HEAD = "reinit_class_head"


@dataclass
class FitReport:
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)  # key, ckpt, model
    backbone_only: bool = False

    def __bool__(self):
        return bool(self.missing or self.unexpected or self.mismatched)


def _shape(v) -> Tuple[int, ...]:
    return tuple(getattr(v, "shape", ()))


def compare_state_dicts(checkpoint: Dict, model: Dict) -> FitReport:
    """Compare names and shapes. A checkpoint whose keys are all under ``backbone.`` (ImageNet
    weights) only has to cover and fit the model's backbone."""
    backbone_only = bool(checkpoint) and all(k.startswith("backbone.") for k in checkpoint)
    needed = [k for k in model if k.startswith("backbone.")] if backbone_only else list(model)
    return FitReport(
        missing=sorted(k for k in needed if k not in checkpoint),
        unexpected=sorted(k for k in checkpoint if k not in model),
        mismatched=[(k, _shape(checkpoint[k]), _shape(model[k])) for k in sorted(checkpoint)
                    if k in model and _shape(checkpoint[k]) != _shape(model[k])],
        backbone_only=backbone_only,
    )


def class_head_keys(keys) -> List[str]:
    """The class-logit layers: ``class_embed.*`` (DAB-DETR) or ``class_embed.<layer>.*`` (deformable)."""
    return [k for k in keys if re.match(r"class_embed\.(\d+\.)?(weight|bias)$", k)]


def _causes(report: FitReport, checkpoint: Dict, model: Dict, path: str) -> List[str]:
    causes = []
    mismatched = {k: (c, m) for k, c, m in report.mismatched}
    unexpected, missing = set(report.unexpected), set(report.missing)
    if report.backbone_only:
        causes.append("this is a backbone-only (ImageNet) file whose backbone is not the one the config builds "
                      "(e.g. a ResNet-18/34 file for a ResNet-50 config): use the backbone weights that match "
                      "model.backbone, or change model.backbone")
        return causes
    if "refpoint_embed.weight" in mismatched:
        (q, _), (q_model, _) = mismatched["refpoint_embed.weight"]
        causes.append(f"the checkpoint has {q} anchors (queries), the config builds {q_model}: "
                      f"add model.num_queries={q}")
    for key, option in (("transformer.patterns.weight", "model.transformer.num_patterns"),
                        ("patterns_embed.weight", "model.num_patterns")):
        if key in unexpected or key in mismatched:
            p = _shape(checkpoint[key])[0]
            causes.append(f"the checkpoint has {p} pattern embeddings ({key}), the config "
                          f"{'builds ' + str(mismatched[key][1][0]) if key in mismatched else 'has none'}: add {option}={p}")
        elif key in missing:
            causes.append(f"the config builds {_shape(model[key])[0]} pattern embeddings, the checkpoint has none: "
                          f"add {option}=0")
    heads = [k for k in class_head_keys(mismatched)]
    if heads:
        c, c_model = mismatched[heads[0]][0][0], mismatched[heads[0]][1][0]
        causes.append(f"the checkpoint has {c} classes, the config {c_model}: to evaluate it add model.num_classes={c}; "
                      f"to fine-tune it on {c_model} classes, load it with "
                      f"train.init_checkpoint={path}?{REINIT_CLASS_HEAD}=True (the class head starts fresh)")
    if any(k.startswith("transformer.enc_output") for k in unexpected):
        causes.append("a two-stage DAB-Deformable-DETR checkpoint: use configs/dab_deformable_detr_r50_two_stage.py")
    elif any(k.startswith("transformer.enc_output") for k in missing):
        causes.append("a one-stage checkpoint in a two-stage config: use configs/dab_deformable_detr_r50.py")
    explained = {"refpoint_embed.weight", "transformer.patterns.weight", "patterns_embed.weight", *heads}
    rest = (unexpected | missing | set(mismatched)) - explained
    rest = {k for k in rest if not k.startswith("transformer.enc_output")}
    if rest:
        causes.append("other keys differ: the checkpoint is of another model or backbone than the config builds "
                      "(wrong --config-file, e.g. R50 vs R101, DAB-DETR vs DAB-Deformable-DETR), or a file of "
                      "another codebase that needs tools/convert_checkpoint.py first")
    return causes


def explain_misfit(report: FitReport, checkpoint: Dict, model: Dict, path: str, model_name: str) -> str:
    """The one error message: what does not fit, the likely cause and the fix."""
    lines = [f"checkpoint {path} does not fit the {model_name} built by the config:"]
    if report.missing:
        lines.append(f"  {len(report.missing)} missing key(s) (the model needs them):{fmt(report.missing, 20)}")
    if report.unexpected:
        lines.append(f"  {len(report.unexpected)} unexpected key(s) (the model does not have them):"
                     f"{fmt(report.unexpected, 20)}")
    if report.mismatched:
        items = [f"{k}: checkpoint {c}, model {m}" for k, c, m in report.mismatched]
        lines.append(f"  {len(items)} shape mismatch(es):{fmt(items, 20)}")
    lines.append("likely cause and fix:")
    lines += [f"  - {c}" for c in _causes(report, checkpoint, model, path)]
    return "\n".join(lines)
