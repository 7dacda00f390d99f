"""Convert DAB-Deformable-DETR checkpoints to the names of :class:`DABDeformableDETR`.

Three sources (SPEC-deformable section 4):

- ``"original"``: the authors' repository (v1/v2 checkpoints, one-stage). torchvision ResNet
  names under ``backbone.0.body.``; 91 class logits indexed by COCO category id; the box heads
  saved twice (``bbox_embed.*`` and the alias ``transformer.decoder.bbox_embed.*``).
- ``"dn-detr"``: DN-DETR's DN-DAB-Deformable-DETR (one-stage): the original's layout plus the
  denoising label embedding ``label_enc.weight`` [92, 255] (rows by COCO category id, the last
  one the "unknown" label; its 80 class rows and the last are kept) and 255-wide ``tgt_embed``.
- ``"detrex"``: detrex's ``projects/dab_deformable_detr`` (one-stage and two-stage): Detectron2
  ResNet names, ``neck.*`` for the input projections, ``attentions/ffns/norms`` layer lists.

Our names are the original's for everything but the backbone (Detectron2 names), so the mapping
from the original is short; detrex's layer lists map back to the original's names.
"""
import re
from typing import Dict, Optional

import torch

from .backbone_names import torchvision_to_d2_resnet_name
from .safe_load import CheckpointError

__all__ = [
    "COCO_CATEGORY_IDS", "convert_deformable_state_dict", "deformable_config_for", "detect_deformable_source",
]

# COCO category id of each of the 80 contiguous classes (Detectron2's order: sorted ids)
COCO_CATEGORY_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
]

_SOURCES = ("original", "detrex", "dn-detr")


def detect_deformable_source(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """``"original"``, ``"dn-detr"`` or ``"detrex"`` for a DAB-Deformable-DETR state dict, else ``None``."""
    # every deformable attention layer has sampling offsets; plain DAB-DETR has none
    if not any(".sampling_offsets." in k for k in state_dict):
        return None
    if any(k.startswith("backbone.0.body.") for k in state_dict):
        return "dn-detr" if "label_enc.weight" in state_dict else "original"
    if any(k.startswith("neck.") for k in state_dict):
        return "detrex"
    return None


def deformable_config_for(converted: Dict[str, torch.Tensor]) -> str:
    """The config that builds the model of a converted state dict (one- or two-stage)."""
    if "transformer.enc_output.weight" in converted:
        return "configs/dab_deformable_detr_r50_two_stage.py"
    if "label_enc.weight" in converted:
        return "configs/dn_dab_deformable_detr_r50.py"
    return "configs/dab_deformable_detr_r50.py"


def _check_alias(state_dict, key):
    """An alias ``transformer.decoder.{bbox,class}_embed.*`` must hold the same tensor as the head."""
    target = key[len("transformer.decoder."):]
    if target not in state_dict:
        raise CheckpointError(f"{key} is an alias of {target}, which the checkpoint lacks")
    if not torch.equal(state_dict[key], state_dict[target]):
        raise CheckpointError(
            f"{key} differs from {target}; they should be the same tensor (one head list saved twice)"
        )


def _original_name(key: str) -> Optional[str]:
    if key.startswith("backbone.0.body."):
        try:
            new = torchvision_to_d2_resnet_name(key[len("backbone.0.body."):])
        except KeyError:
            return ""  # not a ResNet name: reported as unknown below
        return None if new is None else "backbone." + new
    if key.startswith(("transformer.pos_trans", "transformer.enc_output")):
        raise CheckpointError(
            f"{key}: this is a checkpoint of the original two-stage code, which does not run "
            "(SPEC-deformable section 6.2) and is not supported; use detrex's two-stage checkpoint"
        )
    return key


_DETREX_RULES = [
    (r"^neck\.convs\.(\d+)\.conv\.", lambda m, n: f"input_proj.{m.group(1)}.0."),
    (r"^neck\.convs\.(\d+)\.norm\.", lambda m, n: f"input_proj.{m.group(1)}.1."),
    (r"^neck\.extra_convs\.(\d+)\.conv\.", lambda m, n: f"input_proj.{n + int(m.group(1))}.0."),
    (r"^neck\.extra_convs\.(\d+)\.norm\.", lambda m, n: f"input_proj.{n + int(m.group(1))}.1."),
    (r"^transformer\.level_embeds$", lambda m, n: "transformer.level_embed"),
    (r"^(transformer\.encoder\.layers\.\d+\.)attentions\.0\.", lambda m, n: m.group(1) + "self_attn."),
    (r"^(transformer\.encoder\.layers\.\d+\.)norms\.0\.", lambda m, n: m.group(1) + "norm1."),
    (r"^(transformer\.encoder\.layers\.\d+\.)norms\.1\.", lambda m, n: m.group(1) + "norm2."),
    (r"^(transformer\.decoder\.layers\.\d+\.)attentions\.0\.attn\.", lambda m, n: m.group(1) + "self_attn."),
    (r"^(transformer\.decoder\.layers\.\d+\.)attentions\.1\.", lambda m, n: m.group(1) + "cross_attn."),
    # detrex orders the norms by call (self-attn, cross-attn, FFN); the original names them 2, 1, 3
    (r"^(transformer\.decoder\.layers\.\d+\.)norms\.0\.", lambda m, n: m.group(1) + "norm2."),
    (r"^(transformer\.decoder\.layers\.\d+\.)norms\.1\.", lambda m, n: m.group(1) + "norm1."),
    (r"^(transformer\.decoder\.layers\.\d+\.)norms\.2\.", lambda m, n: m.group(1) + "norm3."),
    (r"^(transformer\.(?:en|de)coder\.layers\.\d+\.)ffns\.0\.layers\.0\.0\.", lambda m, n: m.group(1) + "linear1."),
    (r"^(transformer\.(?:en|de)coder\.layers\.\d+\.)ffns\.0\.layers\.1\.", lambda m, n: m.group(1) + "linear2."),
]

_OUR_NAMES = re.compile(
    r"^(backbone\.|input_proj\.\d+\.[01]\.|transformer\.level_embed$|"
    r"transformer\.encoder\.layers\.\d+\.(self_attn\.|norm[12]\.|linear[12]\.)|"
    r"transformer\.decoder\.layers\.\d+\.(self_attn\.|cross_attn\.|norm[123]\.|linear[12]\.)|"
    r"transformer\.decoder\.(query_scale|ref_point_head)\.layers\.\d+\.|"
    r"transformer\.enc_output(_norm)?\.|"
    r"class_embed\.\d+\.|bbox_embed\.\d+\.layers\.\d+\.|tgt_embed\.weight$|refpoint_embed\.weight$|"
    r"patterns_embed\.weight$|label_enc\.weight$)"
)


def _detrex_name(key: str, num_convs: int) -> str:
    for pattern, replace in _DETREX_RULES:
        m = re.match(pattern, key)
        if m:
            return replace(m, num_convs) + key[m.end():]
    return key


def convert_deformable_state_dict(
    state_dict: Dict[str, torch.Tensor], source: str, *, coco_91_to_80: bool = True
) -> Dict[str, torch.Tensor]:
    """Rename a DAB-Deformable-DETR state dict to :class:`DABDeformableDETR`'s names.

    Args:
        state_dict: the model weights (``checkpoint["model"]``), without a ``module.`` prefix.
        source: ``"original"`` (authors' repository, v1/v2), ``"dn-detr"`` or ``"detrex"``
            (one- or two-stage).
        coco_91_to_80: for ``"original"`` and ``"dn-detr"``, keep only the 80 class-logit rows of
            the COCO category ids (Detectron2's contiguous classes, as detrex's converters do),
            and of ``label_enc`` also its last ("unknown") row. With False, the 91 (92) rows are
            kept and the model must be built with ``num_classes=91``.

    Returns:
        A new dict; tensors are shared, not copied. The alias ``transformer.decoder.bbox_embed.*``
        (and ``.class_embed.*``) keys are checked to equal the top-level heads and dropped.

    Raises:
        CheckpointError (a ValueError): unknown source; keys that are not part of the layout
            (listed); alias keys that differ from the heads; an original two-stage checkpoint.
    """
    if source not in _SOURCES:
        raise CheckpointError(f"source must be one of {_SOURCES}, got {source!r}")
    num_convs = len({k.split(".")[2] for k in state_dict if k.startswith("neck.convs.")})
    out, unknown = {}, []
    for key, value in state_dict.items():
        alias = re.match(r"^transformer\.decoder\.((?:bbox|class)_embed\.)", key)
        if alias:
            _check_alias(state_dict, key)
            continue
        original_layout = source in ("original", "dn-detr")
        new = _original_name(key) if original_layout else _detrex_name(key, num_convs)
        if new is None:
            continue
        if not _OUR_NAMES.match(new):
            unknown.append(key)
            continue
        if original_layout and coco_91_to_80 and new.startswith("class_embed."):
            if value.shape[0] != 91:
                raise CheckpointError(f"{key}: expected 91 class rows (COCO category ids), got shape {tuple(value.shape)}")
            value = value[COCO_CATEGORY_IDS]
        if original_layout and coco_91_to_80 and new == "label_enc.weight":
            if value.shape[0] != 92:
                raise CheckpointError(f"{key}: expected 92 rows (COCO category ids and 'unknown'), got shape "
                                      f"{tuple(value.shape)}")
            value = value[COCO_CATEGORY_IDS + [91]]
        out[new] = value
    if unknown:
        raise CheckpointError(f"keys not part of the {source} DAB-Deformable-DETR layout: {sorted(unknown)}")
    return out
