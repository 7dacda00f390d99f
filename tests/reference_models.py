"""Test-only helpers: checkpoints in the layouts of the released DAB-DETR weights, built with
random values, and the independent reference implementation (transformers' DabDetr).

Nothing here uses ``dab_detr.checkpoint``: the key renamings below are written from the module
structures of the original code (SPEC section 9, torchvision's ResNet), of transformers and of
detrex, so that a test compares our converter against an independent mapping. The original ->
transformers renaming follows transformers' own conversion script (not shipped in the wheel).
"""
import argparse
import functools
import math
import os
import re
from typing import Dict, Tuple

import numpy as np
import torch

# COCO category ids of the 80 object classes, in Detectron2's contiguous order (written out
# here rather than read from Detectron2, so the test does not share the converter's source)
COCO_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
            27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51,
            52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77,
            78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]

D, FFN, LAYERS = 256, 2048, 6


# ----------------------------------------------------------------------------- original layout
def _torchvision_resnet_shapes(depth: int) -> Dict[str, Tuple[int, ...]]:
    import torchvision

    net = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth]
    with torch.device("meta"):
        sd = net(weights=None).state_dict()
    return {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("fc.") and "num_batches_tracked" not in k}


def original_shapes(num_patterns: int = 0, depth: int = 50, num_queries: int = 300) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of an original DAB-DETR checkpoint's ``model`` (SPEC section 9)."""
    s = {f"backbone.0.body.{k}": v for k, v in _torchvision_resnet_shapes(depth).items()}

    def linear(name, out_dim, in_dim):
        s[f"{name}.weight"], s[f"{name}.bias"] = (out_dim, in_dim), (out_dim,)

    def mlp(name, dims):
        for i in range(len(dims) - 1):
            linear(f"{name}.layers.{i}", dims[i + 1], dims[i])

    s["input_proj.weight"], s["input_proj.bias"] = (D, 2048, 1, 1), (D,)
    s["refpoint_embed.weight"] = (num_queries, 4)
    linear("class_embed", 91, D)
    mlp("bbox_embed", [D, D, D, 4])
    mlp("transformer.encoder.query_scale", [D, D, D])
    for i in range(LAYERS):
        p = f"transformer.encoder.layers.{i}"
        s[f"{p}.self_attn.in_proj_weight"], s[f"{p}.self_attn.in_proj_bias"] = (3 * D, D), (3 * D,)
        linear(f"{p}.self_attn.out_proj", D, D)
        linear(f"{p}.linear1", FFN, D)
        linear(f"{p}.linear2", D, FFN)
        for n in ("norm1", "norm2"):
            s[f"{p}.{n}.weight"], s[f"{p}.{n}.bias"] = (D,), (D,)
        s[f"{p}.activation.weight"] = (1,)
    for i in range(LAYERS):
        p = f"transformer.decoder.layers.{i}"
        names = ["sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj",
                 "self_attn.out_proj", "ca_qcontent_proj", "ca_kcontent_proj", "ca_kpos_proj", "ca_v_proj",
                 "ca_qpos_sine_proj", "cross_attn.out_proj"] + (["ca_qpos_proj"] if i == 0 else [])
        for n in names:
            linear(f"{p}.{n}", D, D)
        linear(f"{p}.linear1", FFN, D)
        linear(f"{p}.linear2", D, FFN)
        for n in ("norm1", "norm2", "norm3"):
            s[f"{p}.{n}.weight"], s[f"{p}.{n}.bias"] = (D,), (D,)
        s[f"{p}.activation.weight"] = (1,)
    s["transformer.decoder.norm.weight"], s["transformer.decoder.norm.bias"] = (D,), (D,)
    mlp("transformer.decoder.query_scale", [D, D, D])
    mlp("transformer.decoder.ref_point_head", [2 * D, D, D])
    mlp("transformer.decoder.ref_anchor_head", [D, D, 2])
    mlp("transformer.decoder.bbox_embed", [D, D, D, 4])  # the original registers bbox_embed twice
    if num_patterns:
        s["transformer.patterns.weight"] = (num_patterns, D)
    return s


def _random_value(name: str, shape, g: torch.Generator) -> torch.Tensor:
    """Values of a trained-looking network: fan-in-scaled weights, BN statistics, PReLU ~0.25."""
    if name.endswith("running_var"):
        return torch.rand(shape, generator=g) * 0.5 + 0.75
    if name.endswith("running_mean"):
        return torch.randn(shape, generator=g) * 0.1
    if name.endswith("activation.weight"):
        return 0.25 + 0.05 * torch.randn(shape, generator=g)
    if name in ("refpoint_embed.weight", "transformer.patterns.weight"):
        return torch.randn(shape, generator=g)
    if len(shape) == 1:
        is_norm = re.search(r"(norm\d?|bn\d|downsample\.1|layernorm)\.weight$", name) is not None
        return (1.0 + 0.1 * torch.randn(shape, generator=g)) if is_norm else 0.05 * torch.randn(shape, generator=g)
    fan_in = int(np.prod(shape[1:]))
    return torch.randn(shape, generator=g) * math.sqrt(1.0 / fan_in)


def random_original_state_dict(num_patterns: int = 0, depth: int = 50, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random weights with the original's names; cached (callers get a new dict of shared tensors)."""
    return dict(_random_original_state_dict(num_patterns, depth, seed))


@functools.lru_cache(maxsize=4)
def _random_original_state_dict(num_patterns: int, depth: int, seed: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: _random_value(k, shape, g) for k, shape in original_shapes(num_patterns, depth).items()}
    for k in list(sd):
        if k.startswith("transformer.decoder.bbox_embed."):
            sd[k] = sd[k[len("transformer.decoder."):]].clone()  # the same module, saved twice
    # the last box layer of a trained model predicts modest offsets
    sd["bbox_embed.layers.2.weight"].mul_(0.3)
    sd["transformer.decoder.bbox_embed.layers.2.weight"].mul_(0.3)
    return sd


def original_checkpoint(state_dict: Dict[str, torch.Tensor], **args) -> Dict:
    """What the original ``main.py`` saves: weights plus optimizer, scheduler, epoch and args."""
    namespace = argparse.Namespace(backbone="resnet50", dilation=False, num_queries=300, num_patterns=0,
                                   pe_temperatureH=20, pe_temperatureW=20, random_refpoints_xy=False,
                                   lr=1e-4, epochs=50)
    for k, v in args.items():
        setattr(namespace, k, v)
    return {
        "model": state_dict,
        "optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
                      "param_groups": [{"lr": 1e-5, "weight_decay": 1e-4, "params": [0]}]},
        "lr_scheduler": {"step_size": 40, "gamma": 0.1, "base_lrs": [1e-4], "last_epoch": 50},
        "epoch": 49,
        "args": namespace,
    }


# ----------------------------------------------------------------------------- transformers layout
_ORIGINAL_TO_HF = [
    (r"^backbone\.0\.body\.", "model.backbone.conv_encoder.model._backbone."),
    (r"^backbone\.", "model.backbone.conv_encoder.model.swin."),  # a Swin backbone (hf_reference(backbone="swin_t"))
    (r"^input_proj\.", "model.input_projection."),
    (r"^refpoint_embed\.weight$", "model.query_refpoint_embeddings.weight"),
    (r"^transformer\.patterns\.weight$", "model.patterns.weight"),
    (r"^bbox_embed\.", "bbox_predictor."),
    (r"^transformer\.decoder\.bbox_embed\.", "model.decoder.bbox_embed."),
    (r"^transformer\.encoder\.query_scale\.", "model.encoder.query_scale."),
    (r"^transformer\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"model.encoder.layers.\1.self_attn.out_proj."),
    (r"^transformer\.encoder\.layers\.(\d+)\.linear(\d)\.", r"model.encoder.layers.\1.fc\2."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm1\.", r"model.encoder.layers.\1.self_attn_layer_norm."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm2\.", r"model.encoder.layers.\1.final_layer_norm."),
    (r"^transformer\.encoder\.layers\.(\d+)\.activation\.", r"model.encoder.layers.\1.activation_fn."),
    (r"^transformer\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"model.decoder.layers.\1.self_attn.self_attn.output_proj."),
    (r"^transformer\.decoder\.layers\.(\d+)\.cross_attn\.out_proj\.", r"model.decoder.layers.\1.cross_attn.cross_attn.output_proj."),
    (r"^transformer\.decoder\.layers\.(\d+)\.linear(\d)\.", r"model.decoder.layers.\1.mlp.fc\2."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm1\.", r"model.decoder.layers.\1.self_attn.self_attn_layer_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm2\.", r"model.decoder.layers.\1.cross_attn.cross_attn_layer_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm3\.", r"model.decoder.layers.\1.mlp.final_layer_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.activation\.", r"model.decoder.layers.\1.mlp.activation_fn."),
    (r"^transformer\.decoder\.layers\.(\d+)\.sa_qcontent_proj\.", r"model.decoder.layers.\1.self_attn.self_attn_query_content_proj."),
    (r"^transformer\.decoder\.layers\.(\d+)\.sa_qpos_proj\.", r"model.decoder.layers.\1.self_attn.self_attn_query_pos_proj."),
    (r"^transformer\.decoder\.layers\.(\d+)\.sa_kcontent_proj\.", r"model.decoder.layers.\1.self_attn.self_attn_key_content_proj."),
    (r"^transformer\.decoder\.layers\.(\d+)\.sa_kpos_proj\.", r"model.decoder.layers.\1.self_attn.self_attn_key_pos_proj."),
    (r"^transformer\.decoder\.layers\.(\d+)\.sa_v_proj\.", r"model.decoder.layers.\1.self_attn.self_attn_value_proj."),
    (r"^transformer\.decoder\.layers\.(\d+)\.ca_qcontent_proj\.", r"model.decoder.layers.\1.cross_attn.cross_attn_query_content_proj."),
    (r"^transformer\.decoder\.layers\.(\d+)\.ca_qpos_proj\.", r"model.decoder.layers.\1.cross_attn.cross_attn_query_pos_proj."),
    (r"^transformer\.decoder\.layers\.(\d+)\.ca_kcontent_proj\.", r"model.decoder.layers.\1.cross_attn.cross_attn_key_content_proj."),
    (r"^transformer\.decoder\.layers\.(\d+)\.ca_kpos_proj\.", r"model.decoder.layers.\1.cross_attn.cross_attn_key_pos_proj."),
    (r"^transformer\.decoder\.layers\.(\d+)\.ca_v_proj\.", r"model.decoder.layers.\1.cross_attn.cross_attn_value_proj."),
    (r"^transformer\.decoder\.layers\.(\d+)\.ca_qpos_sine_proj\.", r"model.decoder.layers.\1.cross_attn.cross_attn_query_pos_sine_proj."),
    (r"^transformer\.decoder\.norm\.", "model.decoder.layernorm."),
    (r"^transformer\.decoder\.(query_scale|ref_point_head|ref_anchor_head)\.", r"model.decoder.\1."),
]


def original_to_hf(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Original DAB-DETR names -> ``DabDetrForObjectDetection`` names (91 classes kept)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"transformer\.encoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$", k)
        if m:
            for part, chunk in zip("qkv", v.chunk(3, dim=0)):
                out[f"model.encoder.layers.{m.group(1)}.self_attn.{part}_proj.{m.group(2)}"] = chunk.clone()
            continue
        new = k
        for pattern, repl in _ORIGINAL_TO_HF:
            new, n = re.subn(pattern, repl, new)
            if n:
                break
        out[new] = v.clone()
    return out


# ----------------------------------------------------------------------------- detrex layout
# The key lists of detrex's released DAB-DETR files (shared/spec-data, copied to tests/data): every
# state-dict key with its shape, as detrex's LazyConfigs build the models. Test checkpoints of the
# detrex layout are built from these lists only.
KEY_LISTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "key_lists")
DETREX_MODELS = {  # name: (key list, num_patterns, DC5, ResNet depth or None for Swin-T)
    "R50": ("detrex_dab_detr_r50_keys.txt", 0, False, 50),
    "R50-3patterns": ("detrex_dab_detr_r50_3patterns_keys.txt", 3, False, 50),
    "R50-DC5": ("detrex_dab_detr_r50_dc5_keys.txt", 0, True, 50),
    "R50-DC5-3patterns": ("detrex_dab_detr_r50_dc5_3patterns_keys.txt", 3, True, 50),
    "R101": ("detrex_dab_detr_r101_keys.txt", 0, False, 101),
    "Swin-T": ("detrex_dab_detr_swin_t_keys.txt", 0, False, None),
}


def read_key_list(file_name: str) -> Tuple[str, Dict[str, Tuple[int, ...]]]:
    """(header line, {key: shape}) of a key list ``name [d0, d1, ...]`` per line."""
    with open(os.path.join(KEY_LISTS, file_name), encoding="utf-8") as f:
        lines = f.read().splitlines()
    shapes = {}
    for line in lines[1:]:
        key, shape = line.split(" ", 1)
        shapes[key] = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
    return lines[0], shapes


def released_file_name(header: str) -> str:
    """The released file name a key list's header names ("released as X.pth")."""
    return re.search(r"released as ([\w.\-]+\.pth)", header).group(1)


def _swin_relative_position_index(window: int) -> torch.Tensor:
    """The fixed buffer of a Swin window attention: index of (dy + w - 1) * (2w - 1) + dx + w - 1."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def _detrex_value(name: str, shape, g: torch.Generator) -> torch.Tensor:
    if name.endswith("relative_position_index"):
        return _swin_relative_position_index(int(math.isqrt(shape[0])))
    if re.search(r"(norms\.\d|norm\d?|bn\d|downsample\.1)\.weight$", name):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if name.endswith(("ffns.0.activation.weight", "ffns.0.layers.0.1.weight")):
        return 0.25 + 0.05 * torch.randn(shape, generator=g)
    if name in ("anchor_box_embed.weight", "transformer.patterns.weight"):
        return torch.randn(shape, generator=g)
    return _random_value(name, shape, g)


def random_detrex_checkpoint(model: str, seed: int = 0) -> Tuple[str, Dict[str, torch.Tensor]]:
    """(released file name, random state dict with exactly the key list's names and shapes);
    cached (callers get a new dict of shared tensors).

    Modules that detrex registers twice hold one tensor under both names: the FFN's PReLU
    (``ffns.0.activation`` and ``ffns.0.layers.0.1``) and the box head (``bbox_embed`` and
    ``transformer.decoder.bbox_embed``, the same MLP assigned to the decoder)."""
    name, sd = _random_detrex_checkpoint(model, seed)
    return name, dict(sd)


@functools.lru_cache(maxsize=2)
def _random_detrex_checkpoint(model: str, seed: int):
    header, shapes = read_key_list(DETREX_MODELS[model][0])
    g = torch.Generator().manual_seed(seed)
    sd = {k: _detrex_value(k, shape, g) for k, shape in shapes.items()}
    sd["bbox_embed.layers.2.weight"].mul_(0.3)  # the last box layer of a trained model: modest offsets
    for k in sd:
        if k.endswith("ffns.0.layers.0.1.weight"):
            sd[k] = sd[k.replace("layers.0.1.weight", "activation.weight")].clone()
        if k.startswith("transformer.decoder.bbox_embed."):
            sd[k] = sd[k[len("transformer.decoder."):]].clone()
    return released_file_name(header), sd


def _tv_to_d2(name: str) -> str:
    """torchvision ResNet name -> Detectron2 name, as Detectron2's convert-torchvision-to-d2 does."""
    if "layer" not in name:
        name = "stem." + name
    for t in [1, 2, 3, 4]:
        name = name.replace(f"layer{t}", f"res{t + 1}")
    for t in [1, 2, 3]:
        name = name.replace(f"bn{t}", f"conv{t}.norm")
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def _d2_to_tv(name: str) -> str:
    """Detectron2 ResNet name -> torchvision name (the inverse of Detectron2's conversion script)."""
    if name.startswith("stem.conv1.norm."):
        return "bn1." + name[len("stem.conv1.norm."):]
    if name.startswith("stem."):
        return name[len("stem."):]
    m = re.match(r"res(\d)\.(\d+)\.(.+)$", name)
    rest = re.sub(r"^conv(\d)\.norm\.", r"bn\1.", m.group(3))
    rest = rest.replace("shortcut.norm.", "downsample.1.").replace("shortcut.", "downsample.0.")
    return f"layer{int(m.group(1)) - 1}.{m.group(2)}.{rest}"


_DETREX_DECODER = {"attentions.0.query_content_proj": "sa_qcontent_proj", "attentions.0.query_pos_proj": "sa_qpos_proj",
                   "attentions.0.key_content_proj": "sa_kcontent_proj", "attentions.0.key_pos_proj": "sa_kpos_proj",
                   "attentions.0.value_proj": "sa_v_proj", "attentions.0.out_proj": "self_attn.out_proj",
                   "attentions.1.query_content_proj": "ca_qcontent_proj", "attentions.1.query_pos_proj": "ca_qpos_proj",
                   "attentions.1.query_pos_sine_proj": "ca_qpos_sine_proj",
                   "attentions.1.key_content_proj": "ca_kcontent_proj", "attentions.1.key_pos_proj": "ca_kpos_proj",
                   "attentions.1.value_proj": "ca_v_proj", "attentions.1.out_proj": "cross_attn.out_proj"}


def detrex_to_original(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """detrex names -> the original repository's names (a Swin backbone keeps ``backbone.*``).
    Written from detrex's module structure; the PReLU's second copy is checked equal and dropped."""
    out = {}
    for k, v in sd.items():
        if k.startswith("backbone.body."):  # detrex's TorchvisionResNet (DC5)
            out["backbone.0.body." + k[len("backbone.body."):]] = v
            continue
        if re.match(r"backbone\.(stem|res\d)\.", k):
            out["backbone.0.body." + _d2_to_tv(k[len("backbone."):])] = v
            continue
        if k.endswith("ffns.0.layers.0.1.weight"):
            assert torch.equal(v, sd[k.replace("layers.0.1.weight", "activation.weight")]), k
            continue
        m = re.match(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias|in_proj_weight|in_proj_bias)$", k)
        if m:
            part, i, module, wb = m.groups()
            if module == "attentions.0.attn":
                module = "self_attn"
            elif module == "attentions.0.attn.out_proj":
                module = "self_attn.out_proj"
            elif module.startswith("norms."):
                module = f"norm{int(module[-1]) + 1}"
            else:
                module = {"ffns.0.layers.0.0": "linear1", "ffns.0.layers.1": "linear2",
                          "ffns.0.activation": "activation", **_DETREX_DECODER}[module]
            out[f"transformer.{part}.layers.{i}.{module}.{wb}"] = v
            continue
        k = {"anchor_box_embed.weight": "refpoint_embed.weight"}.get(k, k)
        out[k.replace("transformer.decoder.post_norm_layer.", "transformer.decoder.norm.")] = v
    return out


def original_to_detrex(sd: Dict[str, torch.Tensor], dc5: bool = False) -> Dict[str, torch.Tensor]:
    """Original-layout weights (91 or 80 classes) written in detrex's layout (the inverse of
    ``detrex_to_original``; 91 class rows become the 80 of COCO_IDS); checked to give exactly the
    names and shapes of detrex's key list for that model."""
    patterns = sd["transformer.patterns.weight"].shape[0] if "transformer.patterns.weight" in sd else 0
    model = {(0, False): "R50", (3, False): "R50-3patterns", (0, True): "R50-DC5", (3, True): "R50-DC5-3patterns"}
    _, shapes = read_key_list(DETREX_MODELS[model[patterns, dc5]][0])
    template = {k: torch.empty(0) for k in shapes}
    names = {}  # original name -> detrex name, from the key list through detrex_to_original
    for k in shapes:
        if k.endswith("ffns.0.layers.0.1.weight"):
            continue
        (orig,) = detrex_to_original({k: template[k]}).keys()
        names[orig] = k
    out = {}
    for k, v in sd.items():
        if k.startswith("class_embed.") and v.shape[0] == 91:
            v = v[COCO_IDS]
        if k not in names:
            raise KeyError(f"{k} has no place in detrex's layout")
        out[names[k]] = v.clone()
    for k in shapes:
        if k.endswith("ffns.0.layers.0.1.weight"):
            out[k] = out[k.replace("layers.0.1.weight", "activation.weight")].clone()
    assert {k: tuple(v.shape) for k, v in out.items()} == shapes
    return out


# ----------------------------------------------------------------------------- reference model
def hf_reference(num_patterns: int = 0, dilation: bool = False, temperature: int = 20, num_labels: int = 91,
                 backbone: str = "resnet50"):
    """``DabDetrForObjectDetection`` configured as the original (SPEC): no dropout, PReLU,
    ``num_labels`` classes (the original's 91, detrex's 80), 300 queries, image-PE temperature
    ``temperature``, timm ResNet-50/101 (``backbone``; DC5 with ``dilation``), or with
    ``backbone="swin_t"`` Detectron2's Swin-T (the class detrex's Swin-T config builds) in place
    of the timm ResNet. Random weights; load a state dict into it."""
    from transformers import DabDetrConfig, DabDetrForObjectDetection

    config = DabDetrConfig(
        num_labels=num_labels, num_queries=300, num_patterns=num_patterns, dilation=dilation,
        temperature_height=temperature, temperature_width=temperature, backbone="resnet50" if backbone == "swin_t" else backbone,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, activation_function="prelu",
        auxiliary_loss=True, keep_query_pos=False, random_refpoints_xy=False, normalize_before=False,
    )
    model = DabDetrForObjectDetection(config)
    if backbone == "swin_t":
        model.model.backbone.conv_encoder.model = _SwinFeatures()
        model.model.input_projection = torch.nn.Conv2d(768, config.hidden_size, kernel_size=1)
    return model.eval()


class _SwinFeatures(torch.nn.Module):
    """Detectron2's SwinTransformer-T as transformers' backbone: ``.feature_maps`` = [p3]."""

    def __init__(self):
        from detectron2.modeling.backbone import SwinTransformer

        super().__init__()
        self.swin = SwinTransformer(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
                                    out_indices=(3,))

    def forward(self, pixel_values):
        from types import SimpleNamespace

        return SimpleNamespace(feature_maps=[self.swin(pixel_values)["p3"]])


def hf_per_layer(hf_model, pixel_values: torch.Tensor, padding_mask: torch.Tensor):
    """Every decoder layer's logits [L, B, Q, 91] and boxes [L, B, Q, 4] (cx, cy, w, h), computed
    with the reference's own heads exactly as its forward does for the last layer."""
    from transformers.models.dab_detr import modeling_dab_detr

    out = hf_model.model(pixel_values=pixel_values, pixel_mask=(~padding_mask).long())
    hidden, references = out.intermediate_hidden_states, out.reference_points
    logits = hf_model.class_embed(hidden)
    deltas = hf_model.bbox_predictor(hidden)
    boxes = (deltas + modeling_dab_detr.inverse_sigmoid(references)).sigmoid()
    return logits, boxes


def photographs(sizes=((384, 384), (300, 448))):
    """Real photographs shipped by scikit-image (astronaut, chelsea the cat), resized to ``sizes``
    (H, W), as 0-255 float RGB tensors [3, H, W]."""
    from skimage import data
    import torch.nn.functional as F

    images = []
    for img, (h, w) in zip((data.astronaut(), data.chelsea(), data.coffee()), sizes):
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()[None]
        images.append(F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0])
    return images


def padded_photo_batch(sizes):
    """The photographs at ``sizes``, normalized with ImageNet's mean / std (0-255 RGB) and
    zero-padded into one batch: (images [B, 3, H, W], padding mask [B, H, W], True = padding)."""
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    images = photographs(sizes=sizes)
    h, w = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    x = torch.zeros(len(images), 3, h, w)
    padding = torch.ones(len(images), h, w, dtype=torch.bool)
    for i, im in enumerate(images):
        x[i, :, : im.shape[1], : im.shape[2]] = (im - mean) / std
        padding[i, : im.shape[1], : im.shape[2]] = False
    return x, padding
