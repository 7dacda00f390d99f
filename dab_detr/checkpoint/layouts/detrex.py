"""``--source detrex``: IDEA-Research/detrex ``projects/dab_detr`` (its released ``.pth`` files;
key lists in ``shared/spec-data/detrex_dab_detr_*_keys.txt``).

- Backbone: Detectron2's ResNet names (R50, R101: ``backbone.stem.*``, ``backbone.res2.*``),
  Detectron2's Swin (``backbone.patch_embed.*``, ``backbone.layers.*``, ``backbone.norm3.*``),
  both ours already; the DC5 configs use detrex's ``TorchvisionResNet`` wrapper, so their keys are
  torchvision's under ``backbone.body.`` (``backbone.body.layer1.0.conv1.weight``). That wrapper
  is the only DC5 backbone of detrex's DAB-DETR configs, so the key names tell DC5.
- Anchors: ``anchor_box_embed.weight`` (renamed from ``refpoint_embed`` in September 2022).
- Layers: detrex's generic ``attentions`` / ``ffns`` / ``norms`` lists; the norms are numbered in
  call order (self-attention, cross-attention, FFN) = the original's norm1, norm2, norm3; the
  FFN registers its PReLU twice (``ffns.0.activation`` and ``ffns.0.layers.0.1``); the decoder
  keeps a second copy of the box head (``transformer.decoder.bbox_embed``); the shared decoder
  norm is ``post_norm_layer``.
"""
from ..rename import decoder_qk, to, torchvision_backbone
from .base import SourceLayout

_LAYER = r"^transformer\.(encoder|decoder)\.layers\.(\d+)\."
_OUT = r"transformer.\1.layers.\2."
_DEC = r"^transformer\.decoder\.layers\.(\d+)\."
_T_DEC = r"transformer.decoder.layers.\1."


RULES = [
    (r"^backbone\.body\.(.+)$", torchvision_backbone),  # DC5: detrex's TorchvisionResNet wrapper
    (r"^anchor_box_embed\.weight$", to("refpoint_embed.weight")),
    (r"^transformer\.decoder\.bbox_embed\.(.+)$", to(r"bbox_embed.\1")),  # copy of bbox_embed
    (r"^transformer\.encoder\.layers\.(\d+)\.attentions\.0\.attn\."
     r"(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$", to(r"transformer.encoder.layers.\1.self_attn.\2")),
    (_LAYER + r"norms\.([0-2])\.(.+)$", lambda m: (f"transformer.{m.group(1)}.layers.{m.group(2)}."
                                                    f"norm{int(m.group(3)) + 1}.{m.group(4)}", None)),
    (_LAYER + r"ffns\.0\.layers\.0\.0\.(.+)$", to(_OUT + r"linear1.\3")),
    (_LAYER + r"ffns\.0\.layers\.1\.(.+)$", to(_OUT + r"linear2.\3")),
    # the PReLU, registered twice: both copies must be equal
    (_LAYER + r"ffns\.0\.(?:layers\.0\.1|activation)\.weight$", to(_OUT + "activation.weight")),
    (_DEC + r"attentions\.0\.(query|key)_(content|pos)_proj\.(.+)$", decoder_qk("sa")),
    (_DEC + r"attentions\.0\.value_proj\.(.+)$", to(_T_DEC + r"sa_v_proj.\2")),
    (_DEC + r"attentions\.0\.out_proj\.(.+)$", to(_T_DEC + r"self_attn.out_proj.\2")),
    (_DEC + r"attentions\.1\.(query|key)_(content|pos)_proj\.(.+)$", decoder_qk("ca")),
    (_DEC + r"attentions\.1\.query_pos_sine_proj\.(.+)$", to(_T_DEC + r"ca_qpos_sine_proj.\2")),
    (_DEC + r"attentions\.1\.value_proj\.(.+)$", to(_T_DEC + r"ca_v_proj.\2")),
    (_DEC + r"attentions\.1\.out_proj\.(.+)$", to(_T_DEC + r"cross_attn.out_proj.\2")),
    (r"^transformer\.decoder\.post_norm_layer\.(.+)$", to(r"transformer.decoder.norm.\1")),
    (r"^(.+)$", to(r"\1")),  # backbone (Detectron2 names), heads, MLPs, patterns: the same names
]


def settings_from_keys(keys):
    if any(k.startswith("backbone.body.") for k in keys):
        return {"dilation": True}
    if any(k.startswith("backbone.res5.") for k in keys):
        return {"dilation": False}  # detrex's Detectron2-ResNet DAB-DETR configs are all C5
    return {}


LAYOUT = SourceLayout(
    name="detrex",
    description="IDEA-Research/detrex projects/dab_detr (.pth)",
    rules=RULES,
    looks_like=lambda keys: any(k.startswith(("transformer.encoder.layers.0.attentions.",
                                              "transformer.decoder.layers.0.attentions.")) for k in keys),
    settings_from_keys=settings_from_keys,
    example_prefixes=("transformer.encoder.layers.0.attentions",),
)
