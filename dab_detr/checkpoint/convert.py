"""Convert released DAB-DETR checkpoints to this project's state dict.

Each publisher's layout is one module of renaming rules in ``layouts/`` (original, detrex, hf,
mmdet); DAB-Deformable-DETR files (original, detrex) are renamed by ``deformable_convert``. This
module reads the file, applies the rules, and checks the result against the complete list of
names and shapes our model has for the detected variant: any unmapped source key, missing key,
shape mismatch or differing copy raises one ``CheckpointError`` listing all of them. Keys a layout
drops on purpose are reported in the notes with the reason.

Copies of one tensor (the original's ``transformer.decoder.bbox_embed`` = ``bbox_embed``; detrex's
PReLU stored twice per FFN) must be equal and are kept once. The original and transformers
weights have 91 class logits indexed by COCO category id; the 80 rows of Detectron2's contiguous
ids are kept (and of DN-DETR's label embedding, those 80 and its last, "unknown", row). The settings a file saves (DC5, image-PE temperature, patterns, queries, classes)
give the config and the overrides of the evaluation command (``eval_config``).
"""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .deformable_convert import convert_deformable_state_dict, deformable_config_for, detect_deformable_source
from .eval_config import EvalCommand, eval_command
from .layout import Variant, dabdetr_shapes, detect_variant
from .layouts import LAYOUTS, looks_like
from .rename import apply_rules, check_against_model, fmt
from .safe_load import CheckpointError, load_checkpoint_file

__all__ = [
    "SOURCES",
    "ConversionResult",
    "coco_category_ids",
    "detect_layout",
    "convert_state_dict",
    "convert_checkpoint_file",
]

SOURCES = tuple(LAYOUTS)


def coco_category_ids() -> List[int]:
    """The 80 COCO category ids (1..90 with gaps) in the order of Detectron2's contiguous ids."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return sorted(c["id"] for c in COCO_CATEGORIES if c["isthing"])


def detect_layout(state_dict: Dict) -> str:
    """One of ``SOURCES``, ``'ours'`` or ``'unknown'``, from characteristic key names."""
    return looks_like(list(state_dict))


def _example_key(state_dict: Dict, layout: str) -> str:
    prefixes = LAYOUTS[layout].example_prefixes if layout in LAYOUTS else ("transformer.encoder.layers.0.linear1",)
    for k in state_dict:
        if k.startswith(prefixes):
            return k
    return next(iter(state_dict), "<none>")


@dataclass
class ConversionResult:
    state_dict: Dict[str, torch.Tensor]
    variant: Variant
    config: str
    source: str
    notes: List[str] = field(default_factory=list)
    overrides: List[str] = field(default_factory=list)  # key=value the config needs for this checkpoint

    def command(self, checkpoint: str) -> str:
        """The exact evaluation command for the converted file ``checkpoint``."""
        return EvalCommand(self.config, self.overrides).command(checkpoint)

    def checkpoint(self, input_name: str = "") -> Dict:
        """What to ``torch.save``: Detectron2's checkpoint format, loaded by exact names."""
        return {
            "model": self.state_dict,
            "__author__": f"dab-detr tools/convert_checkpoint.py --source {self.source} {input_name}".strip(),
            "matching_heuristics": False,
        }


def _map_classes(state_dict: Dict[str, torch.Tensor], problems: List[str], notes: List[str]) -> None:
    """91 COCO-id-indexed logits -> Detectron2's 80 contiguous classes, in place."""
    weight = state_dict.get("class_embed.weight")
    if weight is None:
        return
    rows = weight.shape[0]
    if rows == 80:
        return
    ids = coco_category_ids()
    if rows <= max(ids):
        problems.append(f"class_embed.weight has {rows} rows; expected 91 (COCO category ids 0..90) or 80")
        return
    for name in ("class_embed.weight", "class_embed.bias"):
        if name in state_dict:
            state_dict[name] = state_dict[name][ids].clone()
    notes.append(f"class_embed: kept the {len(ids)} rows of COCO ids {ids[0]}..{ids[-1]} out of {rows}")


def _map_label_embedding(state_dict: Dict[str, torch.Tensor], problems: List[str], notes: List[str]) -> None:
    """DN-DETR's ``label_enc`` [92, d]: rows of COCO ids 0..90 and the "unknown" label last ->
    the 80 contiguous classes and "unknown" (as ``_map_classes``), in place."""
    weight = state_dict.get("label_enc.weight")
    if weight is None or weight.shape[0] == 81:
        return
    ids = coco_category_ids()
    if weight.shape[0] != max(ids) + 2:
        problems.append(f"label_enc.weight has {weight.shape[0]} rows; expected 92 (COCO ids 0..90 and "
                        "the 'unknown' label) or 81")
        return
    state_dict["label_enc.weight"] = weight[ids + [weight.shape[0] - 1]].clone()
    notes.append(f"label_enc: kept the rows of the {len(ids)} COCO ids and the last ('unknown') row out of {weight.shape[0]}")


def _check_source(state_dict: Dict, source: str, where: str) -> None:
    layout = detect_layout(state_dict)
    if layout == source:
        return
    if layout == "ours":
        raise CheckpointError(f"{where} is already in this project's layout: load it directly "
                              f"(train.init_checkpoint=...), no conversion needed")
    hint = f"; use --source {layout}" if layout in SOURCES else ""
    raise CheckpointError(f"{where} does not look like a {source} checkpoint: its keys look like the {layout} layout "
                          f"(e.g. {_example_key(state_dict, layout)!r}){hint}")


def convert_state_dict(state_dict: Dict[str, torch.Tensor], source: str, *, file_name: str = "",
                       hints: Optional[Dict] = None) -> ConversionResult:
    """Rename ``state_dict`` of layout ``source`` into ours and check it completely.

    Args:
        state_dict: the weights (name -> tensor) of the released checkpoint.
        source: one of ``SOURCES``; must match the layout the keys show.
        file_name: used in messages and, for files that do not save it, to recognize DC5 models
            (their weights equal R50's).
        hints: settings saved with the checkpoint (``dilation``, ``pe_temperature``,
            ``random_refpoints_xy``) used to pick the config and its overrides.

    Raises:
        CheckpointError listing every unmapped key, missing key, extra key and shape mismatch.
    """
    if source not in SOURCES:
        raise CheckpointError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    where = file_name or "the checkpoint"
    non_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise CheckpointError(f"{where}: these entries of the weights are not tensors:{fmt(non_tensors)}")
    _check_source(state_dict, source, where)
    layout = LAYOUTS[source]

    renamed = apply_rules(state_dict, layout.compiled, drop=layout.drop, prepare=layout.prepare)
    notes = [f"dropped {len(keys)} key(s) by rule: {reason}" for reason, keys in renamed.dropped.items()]
    _map_classes(renamed.tensors, renamed.problems, notes)
    _map_label_embedding(renamed.tensors, renamed.problems, notes)
    try:
        variant = detect_variant(renamed.tensors)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    variant.family = layout.config_family
    variant.denoising = "label_enc.weight" in renamed.tensors
    for k, v in {**layout.settings_from_keys(list(state_dict)), **(hints or {})}.items():
        setattr(variant, k, v)
    expected = dabdetr_shapes(variant)
    check_against_model(
        renamed.tensors, expected,
        f"{where} (source {source}, detected {variant.backbone}, "
        f"{variant.num_queries} queries, {variant.num_patterns} patterns)",
        origin=renamed.origin, unmapped=renamed.unmapped, problems=renamed.problems,
    )
    ordered = {k: renamed.tensors[k].contiguous() for k in expected}
    command = eval_command(variant, file_name)
    return ConversionResult(ordered, variant, command.config, source, notes, command.overrides)


def _model_shapes(config_file: str, overrides: List[str]) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of the model a LazyConfig builds with ``key=value`` overrides (on the
    meta device: no memory)."""
    from detectron2.config import LazyConfig, instantiate

    from ..model_zoo import get_config_file

    cfg = LazyConfig.apply_overrides(LazyConfig.load(get_config_file(config_file)), overrides)
    with torch.device("meta"):
        model = instantiate(cfg.model)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_deformable_checkpoint(weights: Dict[str, torch.Tensor], source: str, path: str,
                                  hints: Optional[Dict] = None) -> ConversionResult:
    """Convert a DAB-Deformable-DETR state dict (original v1/v2 or detrex) and check it against its config."""
    detected = detect_deformable_source(weights)
    if source != detected:
        raise CheckpointError(f"{path} is a {detected} DAB-Deformable-DETR checkpoint, but --source is {source}; "
                              f"use --source {detected}")
    converted = convert_deformable_state_dict(weights, source)
    config = deformable_config_for(converted)
    variant = Variant(
        backbone="R50 DAB-Deformable-DETR",
        num_queries=converted["refpoint_embed.weight"].shape[0] if "refpoint_embed.weight" in converted else 300,
        num_patterns=converted["patterns_embed.weight"].shape[0] if "patterns_embed.weight" in converted else 0,
        num_classes=converted["class_embed.0.bias"].shape[0],
        dilation=(hints or {}).get("dilation"),
        family="deformable",
        denoising="label_enc.weight" in converted,
    )
    command = eval_command(variant, config=config)
    expected = _model_shapes(config, command.overrides)
    check_against_model(converted, expected, f"{path} (source {source}, DAB-Deformable-DETR, config {config})")
    notes = ["91 COCO-id class logits reduced to the 80 contiguous classes"] if source != "detrex" else []
    if "label_enc.weight" in converted:
        notes.append("label_enc: kept the rows of the 80 COCO ids and the last ('unknown') row out of 92")
    ordered = {k: converted[k].contiguous() for k in expected}
    return ConversionResult(ordered, variant, config, source, notes, command.overrides)


def convert_checkpoint_file(input_path: str, output_path: Optional[str], source: str) -> ConversionResult:
    """Read ``input_path`` safely, convert it, and (if ``output_path``) write Detectron2's format.

    DAB-DETR and DAB-Deformable-DETR checkpoints are told apart by their keys.
    """
    if source not in SOURCES:
        raise CheckpointError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    obj = load_checkpoint_file(input_path)
    weights, hints = LAYOUTS[source].read(obj, input_path)
    if detect_deformable_source(weights) is not None:
        result = convert_deformable_checkpoint(weights, source, input_path, hints)
    else:
        result = convert_state_dict(weights, source, file_name=os.path.basename(input_path), hints=hints)
    if output_path:
        os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
        torch.save(result.checkpoint(os.path.basename(input_path)), output_path)
    return result
