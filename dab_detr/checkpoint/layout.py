"""The state dict our ``DABDETR`` expects (names of CONTRACT / SPEC section 1, shapes), so that a
conversion can be checked key by key before anything is written, and the variant a checkpoint
holds (backbone, queries, patterns) can be told from its keys."""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .backbone_names import d2_resnet_shapes, d2_swin_shapes, resnet_depth_from_d2_keys

__all__ = ["Variant", "dabdetr_shapes", "detect_variant"]

HIDDEN, FFN, ENC_LAYERS, DEC_LAYERS = 256, 2048, 6, 6  # SPEC section 1; all released models


@dataclass
class Variant:
    """What a checkpoint holds. ``backbone`` is ``"R50"``, ``"R101"`` or ``"Swin-T"`` (DAB-DETR), or
    ``"R50 DAB-Deformable-DETR"``; ``family`` is ``"mmdet"`` for MMDetection's DAB-DETR (its own
    config), ``"deformable"`` for DAB-Deformable-DETR, else ``""``."""

    backbone: str = "R50"
    num_queries: int = 300
    num_patterns: int = 0
    num_classes: int = 80
    # read from the original's saved arguments when present (weights cannot tell these apart)
    dilation: Optional[bool] = None
    pe_temperature: Optional[Tuple[float, float]] = None
    random_refpoints_xy: Optional[bool] = None
    family: str = ""
    denoising: bool = False  # DN-DETR's model: has the label embedding ``label_enc``


def _linear(shapes, name, out_dim, in_dim):
    shapes[name + ".weight"] = (out_dim, in_dim)
    shapes[name + ".bias"] = (out_dim,)


def _mlp(shapes, name, dims):
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        _linear(shapes, f"{name}.layers.{i}", d_out, d_in)


def _norm(shapes, name):
    shapes[name + ".weight"] = (HIDDEN,)
    shapes[name + ".bias"] = (HIDDEN,)


def _head_and_transformer_shapes(v: Variant, backbone_channels: int) -> Dict[str, Tuple[int, ...]]:
    d = HIDDEN
    s: Dict[str, Tuple[int, ...]] = {
        "input_proj.weight": (d, backbone_channels, 1, 1),
        "input_proj.bias": (d,),
        "refpoint_embed.weight": (v.num_queries, 4),
    }
    _linear(s, "class_embed", v.num_classes, d)
    _mlp(s, "bbox_embed", [d, d, d, 4])
    _mlp(s, "transformer.encoder.query_scale", [d, d, d])
    for i in range(ENC_LAYERS):
        p = f"transformer.encoder.layers.{i}."
        s[p + "self_attn.in_proj_weight"] = (3 * d, d)
        s[p + "self_attn.in_proj_bias"] = (3 * d,)
        _linear(s, p + "self_attn.out_proj", d, d)
        _linear(s, p + "linear1", FFN, d)
        _linear(s, p + "linear2", d, FFN)
        _norm(s, p + "norm1")
        _norm(s, p + "norm2")
        s[p + "activation.weight"] = (1,)
    for i in range(DEC_LAYERS):
        p = f"transformer.decoder.layers.{i}."
        projections = ["sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj",
                       "ca_qcontent_proj", "ca_kcontent_proj", "ca_kpos_proj", "ca_v_proj", "ca_qpos_sine_proj",
                       "self_attn.out_proj", "cross_attn.out_proj"]
        if i == 0:  # keep_query_pos is off in every released model
            projections.append("ca_qpos_proj")
        for name in projections:
            _linear(s, p + name, d, d)
        _linear(s, p + "linear1", FFN, d)
        _linear(s, p + "linear2", d, FFN)
        for n in ("norm1", "norm2", "norm3"):
            _norm(s, p + n)
        s[p + "activation.weight"] = (1,)
    _norm(s, "transformer.decoder.norm")
    _mlp(s, "transformer.decoder.query_scale", [d, d, d])
    _mlp(s, "transformer.decoder.ref_point_head", [2 * d, d, d])
    _mlp(s, "transformer.decoder.ref_anchor_head", [d, d, 2])
    if v.num_patterns > 0:
        s["transformer.patterns.weight"] = (v.num_patterns, d)
    if v.denoising:
        s["label_enc.weight"] = (v.num_classes + 1, d - 1)  # classes + "unknown", + 1 indicator
    return s


def dabdetr_shapes(v: Variant) -> Dict[str, Tuple[int, ...]]:
    """Every state-dict name of our ``DABDETR`` for variant ``v`` -> its shape."""
    if v.backbone in ("R50", "R101"):
        backbone = d2_resnet_shapes(int(v.backbone[1:]))
        channels = 2048
    elif v.backbone == "Swin-T":
        backbone = d2_swin_shapes()
        channels = 768
    else:
        raise ValueError(f"unknown backbone {v.backbone!r}; expected R50, R101 or Swin-T")
    shapes = {"backbone." + k: shape for k, shape in backbone.items()}
    shapes.update(_head_and_transformer_shapes(v, channels))
    return shapes


def detect_variant(state_dict: Dict, num_classes: int = 80) -> Variant:
    """Read the variant from a state dict in OUR names (after renaming)."""
    keys = list(state_dict)
    depth = resnet_depth_from_d2_keys(keys)
    if depth is not None:
        backbone = f"R{depth}"
    elif any(k.startswith("backbone.patch_embed.") for k in keys):
        backbone = "Swin-T"
    else:
        backbone_keys = sorted(k for k in keys if k.startswith("backbone."))[:5]
        raise ValueError(f"cannot tell the backbone (ResNet-50/101 or Swin-T) from its keys, e.g. {backbone_keys}")
    refpoints = state_dict.get("refpoint_embed.weight")
    patterns = state_dict.get("transformer.patterns.weight")
    return Variant(
        backbone=backbone,
        num_queries=int(refpoints.shape[0]) if refpoints is not None else 300,
        num_patterns=int(patterns.shape[0]) if patterns is not None else 0,
        num_classes=num_classes,
    )
