"""``--source hf``: transformers' ``DabDetrForObjectDetection`` (``model.safetensors`` or
``pytorch_model.bin``, with ``config.json`` beside it).

The timm ResNet backbone has torchvision's names; the encoder's q/k/v are three linears (ours:
one packed ``in_proj``); ``model.decoder.bbox_embed`` is the tied copy of ``bbox_predictor``. The
first transformers release grouped each decoder layer as ``layer.0/1/2``.
"""
import json
import os
import re

from ..rename import decoder_qk, to, torchvision_backbone
from .base import SourceLayout, weights_under_model

_ENC = r"^model\.encoder\.layers\.(\d+)\."
_DEC = r"^model\.decoder\.layers\.(\d+)\."
_T_ENC = r"transformer.encoder.layers.\1."
_T_DEC = r"transformer.decoder.layers.\1."


RULES = [
    (r"^model\.backbone\.conv_encoder\.model\.(?:_backbone\.)?(.+)$", torchvision_backbone),
    (r"^model\.input_projection\.(weight|bias)$", to(r"input_proj.\1")),
    (r"^model\.query_refpoint_embeddings\.weight$", to("refpoint_embed.weight")),
    (r"^model\.patterns\.weight$", to("transformer.patterns.weight")),
    (r"^class_embed\.(weight|bias)$", to(r"class_embed.\1")),
    (r"^(?:bbox_predictor|model\.decoder\.bbox_embed)\.(layers\.\d+\.(?:weight|bias))$", to(r"bbox_embed.\1")),
    (r"^model\.encoder\.query_scale\.(.+)$", to(r"transformer.encoder.query_scale.\1")),
    (_ENC + r"self_attn\.([qkv])_proj\.(weight|bias)$",
     lambda m: (f"transformer.encoder.layers.{m.group(1)}.self_attn.in_proj_{m.group(3)}",
                ("qkv".index(m.group(2)), 3))),
    (_ENC + r"self_attn\.out_proj\.(.+)$", to(_T_ENC + r"self_attn.out_proj.\2")),
    (_ENC + r"self_attn_layer_norm\.(.+)$", to(_T_ENC + r"norm1.\2")),
    (_ENC + r"final_layer_norm\.(.+)$", to(_T_ENC + r"norm2.\2")),
    (_ENC + r"fc([12])\.(.+)$", to(_T_ENC + r"linear\2.\3")),
    (_ENC + r"activation_fn\.weight$", to(_T_ENC + "activation.weight")),
    (_DEC + r"self_attn\.self_attn_(query|key)_(content|pos)_proj\.(.+)$", decoder_qk("sa")),
    (_DEC + r"self_attn\.self_attn_value_proj\.(.+)$", to(_T_DEC + r"sa_v_proj.\2")),
    (_DEC + r"self_attn\.self_attn\.output_proj\.(.+)$", to(_T_DEC + r"self_attn.out_proj.\2")),
    (_DEC + r"self_attn\.self_attn_layer_norm\.(.+)$", to(_T_DEC + r"norm1.\2")),
    (_DEC + r"cross_attn\.cross_attn_(query|key)_(content|pos)_proj\.(.+)$", decoder_qk("ca")),
    (_DEC + r"cross_attn\.cross_attn_query_pos_sine_proj\.(.+)$", to(_T_DEC + r"ca_qpos_sine_proj.\2")),
    (_DEC + r"cross_attn\.cross_attn_value_proj\.(.+)$", to(_T_DEC + r"ca_v_proj.\2")),
    (_DEC + r"cross_attn\.cross_attn\.output_proj\.(.+)$", to(_T_DEC + r"cross_attn.out_proj.\2")),
    (_DEC + r"cross_attn\.cross_attn_layer_norm\.(.+)$", to(_T_DEC + r"norm2.\2")),
    (_DEC + r"mlp\.fc([12])\.(.+)$", to(_T_DEC + r"linear\2.\3")),
    (_DEC + r"mlp\.final_layer_norm\.(.+)$", to(_T_DEC + r"norm3.\2")),
    (_DEC + r"mlp\.activation_fn\.weight$", to(_T_DEC + "activation.weight")),
    (r"^model\.decoder\.layernorm\.(.+)$", to(r"transformer.decoder.norm.\1")),
    (r"^model\.decoder\.(query_scale|ref_point_head|ref_anchor_head)\.(.+)$", to(r"transformer.decoder.\1.\2")),
]

_OLD_DECODER = [(re.compile(r"(decoder\.layers\.\d+\.)layer\.0\."), r"\1self_attn."),
                (re.compile(r"(decoder\.layers\.\d+\.)layer\.1\."), r"\1cross_attn."),
                (re.compile(r"(decoder\.layers\.\d+\.)layer\.2\."), r"\1mlp.")]


def prepare(key):
    for pattern, repl in _OLD_DECODER:
        key = pattern.sub(repl, key)
    return key


def read(obj, path):
    """The weights, and transformers' settings from ``config.json`` beside them."""
    weights, settings = weights_under_model(obj, path)
    config_json = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if os.path.isfile(config_json):
        with open(config_json, encoding="utf-8") as f:
            cfg = json.load(f)
        if "dilation" in cfg:
            settings["dilation"] = bool(cfg["dilation"])
        if "temperature_height" in cfg:
            settings["pe_temperature"] = (cfg["temperature_height"], cfg.get("temperature_width", cfg["temperature_height"]))
        if "random_refpoints_xy" in cfg:
            settings["random_refpoints_xy"] = bool(cfg["random_refpoints_xy"])
    return weights, settings


LAYOUT = SourceLayout(
    name="hf",
    description="transformers' DabDetrForObjectDetection (model.safetensors / pytorch_model.bin)",
    rules=RULES,
    looks_like=lambda keys: any(k.startswith(("model.decoder.", "model.encoder.", "bbox_predictor.")) for k in keys),
    read=read,
    prepare=prepare,
    example_prefixes=("model.", "bbox_predictor."),
)
