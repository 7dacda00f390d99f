"""``--source mmdet``: MMDetection 3.3.0's DAB-DETR (``dab-detr_r50_8xb2-50e_coco_*.pth``;
every key and the mapping in ``shared/SPEC-mmdet.md``).

The file is ``{"meta": {...}, "state_dict": ...}`` (legacy torch serialization). Backbone:
torchvision's ResNet names under ``backbone.`` with ``nn.BatchNorm2d`` buffers, whose 53
``num_batches_tracked`` counters have no counterpart in a frozen BN and are dropped by rule.
``neck.convs.0.conv`` is the input projection; ``bbox_head.fc_cls`` has mmdet's 80 contiguous
classes (person = 0 ... toothbrush = 79, the order of Detectron2's COCO classes: no remap);
``bbox_head.fc_reg`` is the box head and, at call time, the decoder's anchor-update branch
(stored once). Inside layers: ``self_attn.attn`` wraps the encoder's ``nn.MultiheadAttention``,
the FFN is ``ffn.layers.0.0`` / ``ffn.layers.0.1`` (PReLU) / ``ffn.layers.1``, norms are
``norms.0/1/2`` = norm1/2/3, decoder projections drop the ``sa_`` / ``ca_`` prefix. mmdet's model
computes two things differently from the original (anchor-update eps, box clipping), which
``configs/dab_detr_r50_mmdet.py`` reproduces.
"""
import re

from ..rename import to, torchvision_backbone
from ..safe_load import CheckpointError
from .base import SourceLayout

_ENC = r"^encoder\.layers\.(\d+)\."
_DEC = r"^decoder\.layers\.(\d+)\."
_T_ENC = r"transformer.encoder.layers.\1."
_T_DEC = r"transformer.decoder.layers.\1."

RULES = [
    (r"^backbone\.(.+)$", torchvision_backbone),
    (r"^neck\.convs\.0\.conv\.(weight|bias)$", to(r"input_proj.\1")),
    (r"^bbox_head\.fc_cls\.(weight|bias)$", to(r"class_embed.\1")),
    (r"^bbox_head\.fc_reg\.(layers\.[0-2]\.(?:weight|bias))$", to(r"bbox_embed.\1")),
    (r"^query_embedding\.weight$", to("refpoint_embed.weight")),
    (r"^patterns\.weight$", to("transformer.patterns.weight")),
    (_ENC + r"self_attn\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$",
     to(_T_ENC + r"self_attn.\2")),
    (r"^(encoder|decoder)\.layers\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)$", to(r"transformer.\1.layers.\2.linear1.\3")),
    (r"^(encoder|decoder)\.layers\.(\d+)\.ffn\.layers\.0\.1\.weight$", to(r"transformer.\1.layers.\2.activation.weight")),
    (r"^(encoder|decoder)\.layers\.(\d+)\.ffn\.layers\.1\.(weight|bias)$", to(r"transformer.\1.layers.\2.linear2.\3")),
    (r"^(encoder|decoder)\.layers\.(\d+)\.norms\.([0-2])\.(weight|bias)$",
     lambda m: (f"transformer.{m.group(1)}.layers.{m.group(2)}.norm{int(m.group(3)) + 1}.{m.group(4)}", None)),
    (_DEC + r"self_attn\.(qcontent|qpos|kcontent|kpos|v)_proj\.(weight|bias)$", to(_T_DEC + r"sa_\2_proj.\3")),
    (_DEC + r"cross_attn\.(qcontent|qpos|kcontent|kpos|v|qpos_sine)_proj\.(weight|bias)$",
     to(_T_DEC + r"ca_\2_proj.\3")),
    (_DEC + r"(self_attn|cross_attn)\.out_proj\.(weight|bias)$", to(_T_DEC + r"\2.out_proj.\3")),
    (r"^decoder\.post_norm\.(weight|bias)$", to(r"transformer.decoder.norm.\1")),
    (r"^(encoder|decoder)\.(query_scale|ref_point_head|ref_anchor_head)\.(layers\.\d+\.(?:weight|bias))$",
     to(r"transformer.\1.\2.\3")),
]


def drop(key):
    if re.match(r"^backbone\..+\.num_batches_tracked$", key):
        return "BatchNorm step counters (num_batches_tracked): a frozen BN has none"
    return None


def read(obj, path):
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: an MMDetection checkpoint is a dict with the weights under 'state_dict' "
                              f"(and 'meta'); this one has {keys}")
    return obj["state_dict"], {}


LAYOUT = SourceLayout(
    name="mmdet",
    description="MMDetection 3.3.0's DAB-DETR ({'meta', 'state_dict'} .pth)",
    rules=RULES,
    looks_like=lambda keys: any(k.startswith(("bbox_head.fc_cls.", "bbox_head.fc_reg.", "encoder.layers.0.self_attn.attn.",
                                             "decoder.layers.0.self_attn.qcontent_proj.")) for k in keys),
    read=read,
    drop=drop,
    config_family="mmdet",
    example_prefixes=("bbox_head.", "neck.", "encoder.", "decoder."),
)
