"""Convert released DAB-DETR checkpoints to this project's state dict.

Three sources, one renaming table each:

- ``original``: IDEA-Research/DAB-DETR (``checkpoint.pth``: ``{"model": ..., "optimizer": ...,
  "args": argparse.Namespace}``; SPEC section 9). Transformer and head names are already ours;
  the torchvision ResNet under ``backbone.0.body.`` gets Detectron2 names.
- ``detrex``: IDEA-Research/detrex ``projects/dab_detr`` (Detectron2 backbone names; encoder and
  decoder layers built from detrex's generic ``attentions`` / ``ffns`` / ``norms`` lists).
- ``hf``: the transformers port (``DabDetrForObjectDetection``; ``model.safetensors`` or
  ``pytorch_model.bin``), timm ResNet backbone (= torchvision names), q/k/v of the encoder
  stored as three linears (ours: one packed ``in_proj``).

Copies of one tensor (``transformer.decoder.bbox_embed`` = ``bbox_embed``; detrex's PReLU stored
twice per FFN) must be equal and are kept once. The original and transformers weights have 91
class logits indexed by COCO category id; the 80 rows of Detectron2's contiguous ids are kept.

The result is checked against the full list of names and shapes our model has for the detected
variant: any unmapped source key, missing key or shape mismatch raises ``CheckpointError``
listing all of them.
"""
import argparse
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .backbone_names import torchvision_to_d2_resnet_name
from .deformable_convert import convert_deformable_state_dict, deformable_config_for, detect_deformable_source
from .layout import Variant, dabdetr_shapes, detect_variant, suggest_config
from .safe_load import CheckpointError, load_checkpoint_file

__all__ = [
    "SOURCES",
    "ConversionResult",
    "coco_category_ids",
    "detect_layout",
    "convert_state_dict",
    "convert_checkpoint_file",
]

SOURCES = ("original", "detrex", "hf")


def coco_category_ids() -> List[int]:
    """The 80 COCO category ids (1..90 with gaps) in the order of Detectron2's contiguous ids."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return sorted(c["id"] for c in COCO_CATEGORIES if c["isthing"])


# --------------------------------------------------------------------------- renaming tables
# A rule maps a source name to (our name, piece): piece is None for a whole tensor, or
# (index, count) for one of `count` tensors concatenated along dim 0 (q, k, v -> in_proj).
Rule = Tuple[str, Callable[[re.Match], Tuple[str, Optional[Tuple[int, int]]]]]


def _to(template: str):
    return lambda m: (m.expand(template), None)


def _torchvision_backbone(m: re.Match):
    new = torchvision_to_d2_resnet_name(m.group(1))  # KeyError for names a ResNet does not have
    if new is None or m.group(1).startswith("fc."):
        raise KeyError(m.group(0))
    return "backbone." + new, None


def _qk(m: re.Match, which: int, kind: int, prefix: str):
    """('query'|'key', 'content'|'pos') -> sa_qcontent_proj etc."""
    return f"{prefix}_{m.group(which)[0]}{m.group(kind)}_proj"


_DEC = r"^transformer\.decoder\.layers\.(\d+)\."
ORIGINAL_RULES: List[Rule] = [
    (r"^backbone\.0\.body\.(.+)$", _torchvision_backbone),
    (r"^transformer\.decoder\.bbox_embed\.(.+)$", _to(r"bbox_embed.\1")),  # copy of bbox_embed
    (r"^(.+)$", _to(r"\1")),  # everything else: the same name (checked against our layout)
]

_HF_ENC = r"^model\.encoder\.layers\.(\d+)\."
_HF_DEC = r"^model\.decoder\.layers\.(\d+)\."
_T_ENC = r"transformer.encoder.layers.\1."
_T_DEC = r"transformer.decoder.layers.\1."
HF_RULES: List[Rule] = [
    (r"^model\.backbone\.conv_encoder\.model\.(?:_backbone\.)?(.+)$", _torchvision_backbone),
    (r"^model\.input_projection\.(weight|bias)$", _to(r"input_proj.\1")),
    (r"^model\.query_refpoint_embeddings\.weight$", _to("refpoint_embed.weight")),
    (r"^model\.patterns\.weight$", _to("transformer.patterns.weight")),
    (r"^class_embed\.(weight|bias)$", _to(r"class_embed.\1")),
    (r"^(?:bbox_predictor|model\.decoder\.bbox_embed)\.(layers\.\d+\.(?:weight|bias))$", _to(r"bbox_embed.\1")),
    (r"^model\.encoder\.query_scale\.(.+)$", _to(r"transformer.encoder.query_scale.\1")),
    (_HF_ENC + r"self_attn\.([qkv])_proj\.(weight|bias)$",
     lambda m: (f"transformer.encoder.layers.{m.group(1)}.self_attn.in_proj_{m.group(3)}",
                ("qkv".index(m.group(2)), 3))),
    (_HF_ENC + r"self_attn\.out_proj\.(.+)$", _to(_T_ENC + r"self_attn.out_proj.\2")),
    (_HF_ENC + r"self_attn_layer_norm\.(.+)$", _to(_T_ENC + r"norm1.\2")),
    (_HF_ENC + r"final_layer_norm\.(.+)$", _to(_T_ENC + r"norm2.\2")),
    (_HF_ENC + r"fc([12])\.(.+)$", _to(_T_ENC + r"linear\2.\3")),
    (_HF_ENC + r"activation_fn\.weight$", _to(_T_ENC + "activation.weight")),
    (_HF_DEC + r"self_attn\.self_attn_(query|key)_(content|pos)_proj\.(.+)$",
     lambda m: (f"transformer.decoder.layers.{m.group(1)}.{_qk(m, 2, 3, 'sa')}.{m.group(4)}", None)),
    (_HF_DEC + r"self_attn\.self_attn_value_proj\.(.+)$", _to(_T_DEC + r"sa_v_proj.\2")),
    (_HF_DEC + r"self_attn\.self_attn\.output_proj\.(.+)$", _to(_T_DEC + r"self_attn.out_proj.\2")),
    (_HF_DEC + r"self_attn\.self_attn_layer_norm\.(.+)$", _to(_T_DEC + r"norm1.\2")),
    (_HF_DEC + r"cross_attn\.cross_attn_(query|key)_(content|pos)_proj\.(.+)$",
     lambda m: (f"transformer.decoder.layers.{m.group(1)}.{_qk(m, 2, 3, 'ca')}.{m.group(4)}", None)),
    (_HF_DEC + r"cross_attn\.cross_attn_query_pos_sine_proj\.(.+)$", _to(_T_DEC + r"ca_qpos_sine_proj.\2")),
    (_HF_DEC + r"cross_attn\.cross_attn_value_proj\.(.+)$", _to(_T_DEC + r"ca_v_proj.\2")),
    (_HF_DEC + r"cross_attn\.cross_attn\.output_proj\.(.+)$", _to(_T_DEC + r"cross_attn.out_proj.\2")),
    (_HF_DEC + r"cross_attn\.cross_attn_layer_norm\.(.+)$", _to(_T_DEC + r"norm2.\2")),
    (_HF_DEC + r"mlp\.fc([12])\.(.+)$", _to(_T_DEC + r"linear\2.\3")),
    (_HF_DEC + r"mlp\.final_layer_norm\.(.+)$", _to(_T_DEC + r"norm3.\2")),
    (_HF_DEC + r"mlp\.activation_fn\.weight$", _to(_T_DEC + "activation.weight")),
    (r"^model\.decoder\.layernorm\.(.+)$", _to(r"transformer.decoder.norm.\1")),
    (r"^model\.decoder\.(query_scale|ref_point_head|ref_anchor_head)\.(.+)$", _to(r"transformer.decoder.\1.\2")),
]
# the first transformers release grouped each decoder layer as layer.0/1/2
_HF_OLD_DECODER = [(re.compile(r"(decoder\.layers\.\d+\.)layer\.0\."), r"\1self_attn."),
                   (re.compile(r"(decoder\.layers\.\d+\.)layer\.1\."), r"\1cross_attn."),
                   (re.compile(r"(decoder\.layers\.\d+\.)layer\.2\."), r"\1mlp.")]

_X_LAYER = r"^transformer\.(encoder|decoder)\.layers\.(\d+)\."
_X_OUT = r"transformer.\1.layers.\2."
DETREX_RULES: List[Rule] = [
    (r"^transformer\.decoder\.bbox_embed\.(.+)$", _to(r"bbox_embed.\1")),  # copy of bbox_embed
    (r"^transformer\.encoder\.layers\.(\d+)\.attentions\.0\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$",
     _to(r"transformer.encoder.layers.\1.self_attn.\2")),
    (_X_LAYER + r"norms\.([0-2])\.(.+)$", lambda m: (f"transformer.{m.group(1)}.layers.{m.group(2)}."
                                                      f"norm{int(m.group(3)) + 1}.{m.group(4)}", None)),
    (_X_LAYER + r"ffns\.0\.layers\.0\.0\.(.+)$", _to(_X_OUT + r"linear1.\3")),
    (_X_LAYER + r"ffns\.0\.layers\.1\.(.+)$", _to(_X_OUT + r"linear2.\3")),
    # detrex's FFN registers its PReLU twice (as .activation and inside .layers): both copies
    (_X_LAYER + r"ffns\.0\.(?:layers\.0\.1|activation)\.weight$", _to(_X_OUT + "activation.weight")),
    (_DEC + r"attentions\.0\.(query|key)_(content|pos)_proj\.(.+)$",
     lambda m: (f"transformer.decoder.layers.{m.group(1)}.{_qk(m, 2, 3, 'sa')}.{m.group(4)}", None)),
    (_DEC + r"attentions\.0\.value_proj\.(.+)$", _to(_T_DEC + r"sa_v_proj.\2")),
    (_DEC + r"attentions\.0\.out_proj\.(.+)$", _to(_T_DEC + r"self_attn.out_proj.\2")),
    (_DEC + r"attentions\.1\.(query|key)_(content|pos)_proj\.(.+)$",
     lambda m: (f"transformer.decoder.layers.{m.group(1)}.{_qk(m, 2, 3, 'ca')}.{m.group(4)}", None)),
    (_DEC + r"attentions\.1\.query_pos_sine_proj\.(.+)$", _to(_T_DEC + r"ca_qpos_sine_proj.\2")),
    (_DEC + r"attentions\.1\.value_proj\.(.+)$", _to(_T_DEC + r"ca_v_proj.\2")),
    (_DEC + r"attentions\.1\.out_proj\.(.+)$", _to(_T_DEC + r"cross_attn.out_proj.\2")),
    (r"^transformer\.decoder\.post_norm_layer\.(.+)$", _to(r"transformer.decoder.norm.\1")),
    (r"^(.+)$", _to(r"\1")),  # backbone.*, heads, MLPs, patterns: the same names
]

_RULES = {"original": ORIGINAL_RULES, "hf": HF_RULES, "detrex": DETREX_RULES}
_COMPILED = {s: [(re.compile(p), f) for p, f in rules] for s, rules in _RULES.items()}


# --------------------------------------------------------------------------- layout detection
def detect_layout(state_dict: Dict) -> str:
    """'original', 'detrex', 'hf', 'ours' or 'unknown', from characteristic key names."""
    keys = list(state_dict)
    if any(k.startswith(("model.decoder.", "model.encoder.", "bbox_predictor.")) for k in keys):
        return "hf"
    if any(re.match(r"transformer\.(encoder|decoder)\.layers\.\d+\.(attentions|ffns|norms)\.", k) for k in keys):
        return "detrex"
    if any(k.startswith("backbone.0.body.") for k in keys):
        return "original"
    if "transformer.encoder.layers.0.linear1.weight" in state_dict:
        return "ours"
    return "unknown"


def _example_key(state_dict: Dict, layout: str) -> str:
    probes = {"hf": ("model.", "bbox_predictor."), "detrex": ("transformer.encoder.layers.0.attentions",),
              "original": ("backbone.0.body.",), "ours": ("transformer.encoder.layers.0.linear1",)}
    for k in state_dict:
        if k.startswith(probes.get(layout, ("",))):
            return k
    return next(iter(state_dict), "<none>")


# --------------------------------------------------------------------------- conversion
@dataclass
class ConversionResult:
    state_dict: Dict[str, torch.Tensor]
    variant: Variant
    config: str
    source: str
    notes: List[str] = field(default_factory=list)

    def checkpoint(self, input_name: str = "") -> Dict:
        """What to ``torch.save``: Detectron2's checkpoint format, loaded by exact names."""
        return {
            "model": self.state_dict,
            "__author__": f"dab-detr tools/convert_checkpoint.py --source {self.source} {input_name}".strip(),
            "matching_heuristics": False,
        }


def _fmt(items, limit: int = 60) -> str:
    items = list(items)
    shown = "\n    ".join(str(i) for i in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n    {shown}{more}"


def _rename(state_dict: Dict[str, torch.Tensor], source: str):
    """Apply the source's table. Returns (renamed dict, unmapped source keys, problems)."""
    rules = _COMPILED[source]
    renamed: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    pieces: Dict[str, Dict[int, Tuple[str, torch.Tensor]]] = {}
    piece_count: Dict[str, int] = {}
    unmapped, problems = [], []
    for key, value in state_dict.items():
        name = key
        if source == "hf":
            for pattern, repl in _HF_OLD_DECODER:
                name = pattern.sub(repl, name)
        for pattern, fn in rules:
            m = pattern.match(name)
            if m is None:
                continue
            try:
                new, piece = fn(m)
            except KeyError:
                new = None
            break
        else:
            new = None
        if new is None:
            unmapped.append(key)
            continue
        if piece is not None:
            pieces.setdefault(new, {})[piece[0]] = (key, value)
            piece_count[new] = piece[1]
            continue
        if new in renamed:  # a second copy of one tensor: must be identical
            if renamed[new].shape != value.shape or not torch.equal(renamed[new], value):
                problems.append(f"{key} and {origin[new]} should be copies of one tensor ({new}) but differ")
            continue
        renamed[new] = value
        origin[new] = key
    for new, parts in pieces.items():
        count = piece_count[new]
        if sorted(parts) != list(range(count)):
            have = ", ".join(k for k, _ in parts.values())
            problems.append(f"{new} is assembled from {count} tensors, found only: {have}")
            continue
        renamed[new] = torch.cat([parts[i][1] for i in range(count)], dim=0)
        origin[new] = " + ".join(parts[i][0] for i in range(count))
    return renamed, unmapped, problems, origin


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


def convert_state_dict(state_dict: Dict[str, torch.Tensor], source: str, *, file_name: str = "",
                       hints: Optional[Dict] = None) -> ConversionResult:
    """Rename ``state_dict`` of layout ``source`` into ours and check it completely.

    Args:
        state_dict: the weights (name -> tensor) of the released checkpoint.
        source: one of ``SOURCES``; must match the layout the keys show.
        file_name: used in messages and to recognize DC5 models (their weights equal R50's).
        hints: optional settings saved with the checkpoint (``dilation``, ``pe_temperature``,
            ``random_refpoints_xy``) used to pick the config.

    Raises:
        CheckpointError listing every unmapped key, missing key, extra key and shape mismatch.
    """
    if source not in SOURCES:
        raise CheckpointError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    where = file_name or "the checkpoint"
    non_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise CheckpointError(f"{where}: these entries of the weights are not tensors:{_fmt(non_tensors)}")
    layout = detect_layout(state_dict)
    if layout != source:
        if layout == "ours":
            raise CheckpointError(f"{where} is already in this project's layout: load it directly "
                                  f"(train.init_checkpoint=...), no conversion needed")
        hint = f"; use --source {layout}" if layout in SOURCES else ""
        raise CheckpointError(
            f"{where} does not look like a {source} checkpoint: its keys look like the {layout} layout "
            f"(e.g. {_example_key(state_dict, layout)!r}){hint}"
        )

    renamed, unmapped, problems, origin = _rename(state_dict, source)
    notes: List[str] = []
    _map_classes(renamed, problems, notes)
    try:
        variant = detect_variant(renamed)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    for k, v in (hints or {}).items():
        setattr(variant, k, v)
    if variant.backbone == "Swin-T":
        # detrex's Swin outputs all four stages and has a norm per output; DAB-DETR reads only the
        # last one (p3), so the norms of p0..p2 are never used: drop them, and say so
        unused = sorted(k for k in renamed if re.match(r"backbone\.norm[012]\.", k))
        for k in unused:
            del renamed[k]
        if unused:
            notes.append(f"dropped the output norms of the unused Swin stages p0-p2: {', '.join(origin[k] for k in unused)}")
    expected = dabdetr_shapes(variant)
    _check_against_model(
        renamed, expected,
        f"{where} (source {source}, detected {variant.backbone}, "
        f"{variant.num_queries} queries, {variant.num_patterns} patterns)",
        origin=origin, unmapped=unmapped, problems=problems,
    )
    ordered = {k: renamed[k].contiguous() for k in expected}
    return ConversionResult(ordered, variant, suggest_config(variant, file_name), source, notes)


def _check_against_model(converted: Dict[str, torch.Tensor], expected: Dict[str, Tuple[int, ...]], what: str,
                         origin: Dict[str, str] = None, unmapped: List[str] = (), problems: List[str] = ()) -> None:
    """Raise one ``CheckpointError`` listing every converted key the model does not have, every
    key it needs that is missing, every shape mismatch, plus the given ``unmapped`` source keys and
    other ``problems``. ``origin`` maps a converted key to its source key, for the messages."""
    origin = origin or {}

    def name(k):
        return f"{origin[k]} -> {k}" if k in origin else k

    unmapped = list(unmapped) + [f"{name(k)} (our model does not have it)"
                                 for k in sorted(set(converted) - set(expected))]
    missing = sorted(set(expected) - set(converted))
    mismatched = [f"{name(k)}: checkpoint {tuple(converted[k].shape)}, model {expected[k]}"
                  for k in sorted(set(expected) & set(converted)) if tuple(converted[k].shape) != expected[k]]
    sections = [("unmapped key(s) (no counterpart in our model)", unmapped),
                ("missing key(s) (our model needs them)", missing),
                ("shape mismatch(es)", mismatched), ("other problem(s)", list(problems))]
    if any(items for _, items in sections):
        lines = [f"cannot convert {what}:"]
        lines += [f"  {len(items)} {title}:{_fmt(items)}" for title, items in sections if items]
        raise CheckpointError("\n".join(lines))


# --------------------------------------------------------------------------- files
def _weights_and_hints(obj, source: str, path: str) -> Tuple[Dict, Dict]:
    """The state dict inside a loaded checkpoint object, and settings saved beside it."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    hints: Dict = {}
    if "model" in obj and isinstance(obj["model"], dict):
        weights = obj["model"]
        args = obj.get("args")
        if isinstance(args, argparse.Namespace):  # the original repository's command line
            if hasattr(args, "dilation"):
                hints["dilation"] = bool(args.dilation)
            if hasattr(args, "pe_temperatureH"):
                hints["pe_temperature"] = (args.pe_temperatureH, getattr(args, "pe_temperatureW", args.pe_temperatureH))
            if hasattr(args, "random_refpoints_xy"):
                hints["random_refpoints_xy"] = bool(args.random_refpoints_xy)
    elif source == "original":
        raise CheckpointError(f"{path}: an original DAB-DETR checkpoint is a dict with the weights under "
                              f"'model'; this one has keys {sorted(obj)[:10]}")
    else:
        weights = obj
    config_json = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if source == "hf" and os.path.isfile(config_json):  # transformers keeps its settings beside the weights
        with open(config_json, encoding="utf-8") as f:
            cfg = json.load(f)
        if "dilation" in cfg:
            hints["dilation"] = bool(cfg["dilation"])
        if "temperature_height" in cfg:
            hints["pe_temperature"] = (cfg["temperature_height"], cfg.get("temperature_width", cfg["temperature_height"]))
        if "random_refpoints_xy" in cfg:
            hints["random_refpoints_xy"] = bool(cfg["random_refpoints_xy"])
    return weights, hints


def _model_shapes(config_file: str, **overrides) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of the model a LazyConfig builds (instantiated on the meta device: no memory)."""
    from detectron2.config import LazyConfig, instantiate

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = LazyConfig.load(os.path.join(root, config_file))
    cfg.model.update(overrides)
    with torch.device("meta"):
        model = instantiate(cfg.model)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_deformable_checkpoint(weights: Dict[str, torch.Tensor], source: str, path: str) -> ConversionResult:
    """Convert a DAB-Deformable-DETR state dict (original v1/v2 or detrex) and check it against its config."""
    detected = detect_deformable_source(weights)
    if source != detected:
        raise CheckpointError(f"{path} is a {detected} DAB-Deformable-DETR checkpoint, but --source is {source}; "
                              f"use --source {detected}")
    converted = convert_deformable_state_dict(weights, source)
    config = deformable_config_for(converted)
    num_patterns = converted["patterns_embed.weight"].shape[0] if "patterns_embed.weight" in converted else 0
    num_classes = converted["class_embed.0.bias"].shape[0]
    num_queries = converted["refpoint_embed.weight"].shape[0] if "refpoint_embed.weight" in converted else 300
    overrides = {"num_classes": num_classes, "num_patterns": num_patterns, "num_queries": num_queries}
    expected = _model_shapes(config, **overrides)
    _check_against_model(converted, expected, f"{path} (source {source}, DAB-Deformable-DETR, config {config})")
    notes = ["91 COCO-id class logits reduced to the 80 contiguous classes"] if source == "original" else []
    if num_patterns:
        notes.append(f"{num_patterns} patterns: evaluate with model.num_patterns={num_patterns}")
    variant = Variant(backbone="R50 DAB-Deformable-DETR", num_queries=num_queries, num_patterns=num_patterns,
                      num_classes=num_classes)
    ordered = {k: converted[k].contiguous() for k in expected}
    return ConversionResult(ordered, variant, config, source, notes)


def convert_checkpoint_file(input_path: str, output_path: Optional[str], source: str) -> ConversionResult:
    """Read ``input_path`` safely, convert it, and (if ``output_path``) write Detectron2's format.

    DAB-DETR and DAB-Deformable-DETR checkpoints are told apart by their keys.
    """
    obj = load_checkpoint_file(input_path)
    weights, hints = _weights_and_hints(obj, source, input_path)
    if detect_deformable_source(weights) is not None:
        result = convert_deformable_checkpoint(weights, source, input_path)
    else:
        result = convert_state_dict(weights, source, file_name=os.path.basename(input_path), hints=hints)
    if output_path:
        os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
        torch.save(result.checkpoint(os.path.basename(input_path)), output_path)
    return result
