"""A checkpoint in the original repository's layout, converted and loaded, gives the outputs of an
independent computation of the same network (SPEC-deformable section 2), one image at a time and
in a padded batch.

The reference below reads the ORIGINAL-named state dict directly and uses only functional torch
ops, torchvision's ResNet-50 with FrozenBatchNorm2d, and the transformers package's pure-PyTorch
multi-scale deformable attention for the bilinear sampling (test-only dependency).
"""
import math

import pytest
import torch
import torchvision
from torch.nn import functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

from detectron2.config import LazyConfig, instantiate

from dab_detr.checkpoint.deformable_convert import (
    COCO_CATEGORY_IDS,
    convert_deformable_state_dict,
    detect_deformable_source,
)

transformers_ddetr = pytest.importorskip("transformers.models.deformable_detr.modeling_deformable_detr")

MODEL_CONFIG = "configs/common/models/dab_deformable_detr_r50.py"
D, HEADS, LEVELS, POINTS, NQ, NCLS = 256, 8, 4, 4, 300, 91


# ----------------------------------------------------------------------------- the checkpoint
def original_state_dict(seed: int = 0) -> dict:
    """Random weights with every key and shape of the released one-stage checkpoint (604 keys)."""
    torch.manual_seed(seed)
    sd = {}
    body = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    for k, v in body.state_dict().items():
        if k.startswith("fc."):
            continue
        if k.endswith(("running_var",)):
            v = 0.5 + torch.rand_like(v)
        elif k.endswith("running_mean"):
            v = 0.1 * torch.randn_like(v)
        elif ".bn" in k or k.startswith("bn1") or "downsample.1" in k:
            v = (1.0 + 0.1 * torch.randn_like(v)) if k.endswith("weight") else 0.05 * torch.randn_like(v)
        sd["backbone.0.body." + k] = v.clone()

    def linear(name, out_dim, in_dim, bias_std=0.05):
        sd[name + ".weight"] = torch.randn(out_dim, in_dim) / math.sqrt(in_dim)
        sd[name + ".bias"] = bias_std * torch.randn(out_dim)

    def norm(name):
        sd[name + ".weight"] = 1.0 + 0.1 * torch.randn(D)
        sd[name + ".bias"] = 0.1 * torch.randn(D)

    def msda(name):
        sd[name + ".sampling_offsets.weight"] = 0.05 * torch.randn(HEADS * LEVELS * POINTS * 2, D)
        sd[name + ".sampling_offsets.bias"] = 2.0 * torch.randn(HEADS * LEVELS * POINTS * 2)
        linear(name + ".attention_weights", HEADS * LEVELS * POINTS, D, bias_std=1.0)
        linear(name + ".value_proj", D, D)
        linear(name + ".output_proj", D, D)

    sd["transformer.level_embed"] = torch.randn(LEVELS, D)
    for i in range(6):
        p = f"transformer.encoder.layers.{i}."
        msda(p + "self_attn")
        norm(p + "norm1")
        linear(p + "linear1", 2048, D)
        linear(p + "linear2", D, 2048)
        norm(p + "norm2")
    for i in range(6):
        p = f"transformer.decoder.layers.{i}."
        msda(p + "cross_attn")
        norm(p + "norm1")
        sd[p + "self_attn.in_proj_weight"] = torch.randn(3 * D, D) / math.sqrt(D)
        sd[p + "self_attn.in_proj_bias"] = 0.05 * torch.randn(3 * D)
        linear(p + "self_attn.out_proj", D, D)
        norm(p + "norm2")
        linear(p + "linear1", 2048, D)
        linear(p + "linear2", D, 2048)
        norm(p + "norm3")
    linear("transformer.decoder.query_scale.layers.0", D, D)
    linear("transformer.decoder.query_scale.layers.1", D, D)
    linear("transformer.decoder.ref_point_head.layers.0", D, 2 * D)
    linear("transformer.decoder.ref_point_head.layers.1", D, D)
    for k in range(6):
        linear(f"class_embed.{k}", NCLS, D, bias_std=1.0)
        linear(f"bbox_embed.{k}.layers.0", D, D)
        linear(f"bbox_embed.{k}.layers.1", D, D)
        linear(f"bbox_embed.{k}.layers.2", 4, D, bias_std=0.5)
        for j in range(3):  # the alias the original saves a second time
            for t in ("weight", "bias"):
                sd[f"transformer.decoder.bbox_embed.{k}.layers.{j}.{t}"] = sd[f"bbox_embed.{k}.layers.{j}.{t}"]
    sd["tgt_embed.weight"] = torch.randn(NQ, D)
    sd["refpoint_embed.weight"] = torch.randn(NQ, 4)
    for lvl, channels in enumerate((512, 1024, 2048)):
        sd[f"input_proj.{lvl}.0.weight"] = torch.randn(D, channels, 1, 1) / math.sqrt(channels)
        sd[f"input_proj.{lvl}.0.bias"] = 0.05 * torch.randn(D)
        norm(f"input_proj.{lvl}.1")
    sd["input_proj.3.0.weight"] = torch.randn(D, 2048, 3, 3) / math.sqrt(9 * 2048)
    sd["input_proj.3.0.bias"] = 0.05 * torch.randn(D)
    norm("input_proj.3.1")
    return sd


# ----------------------------------------------------------------------------- the reference
def sine_pe(mask):
    """Deformable DETR's image position embedding, written out from SPEC-deformable 2.2."""
    not_mask = (~mask).float()
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    y = (y - 0.5) / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = (x - 0.5) / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = 10000 ** (2 * (torch.arange(128) // 2) / 128)
    py, px = y[..., None] / dim_t, x[..., None] / dim_t
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


def box_sine(boxes):
    """[B, Q, 4] (x, y, w, h) -> [B, Q, 512] in the order (y, x, w, h)."""
    dim_t = 10000 ** (2 * (torch.arange(128) // 2) / 128)
    parts = []
    for i in (1, 0, 2, 3):
        v = boxes[..., i, None] * 2 * math.pi / dim_t
        parts.append(torch.stack((v[..., 0::2].sin(), v[..., 1::2].cos()), dim=3).flatten(2))
    return torch.cat(parts, -1)


def lin(sd, name, x):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def ln(sd, name, x):
    return F.layer_norm(x, (D,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)


def mlp(sd, name, x, num_layers):
    for j in range(num_layers):
        x = lin(sd, f"{name}.layers.{j}", x)
        if j < num_layers - 1:
            x = F.relu(x)
    return x


def inv_sigmoid(x):
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=1e-3) / (1 - x).clamp(min=1e-3))


def msda(sd, name, query, reference, value_in, shapes, mask):
    batch, nq, _ = query.shape
    value = lin(sd, name + ".value_proj", value_in)
    value = value.masked_fill(mask[..., None], 0.0).view(batch, -1, HEADS, D // HEADS)
    offsets = lin(sd, name + ".sampling_offsets", query).view(batch, nq, HEADS, LEVELS, POINTS, 2)
    weights = lin(sd, name + ".attention_weights", query).view(batch, nq, HEADS, LEVELS * POINTS)
    weights = weights.softmax(-1).view(batch, nq, HEADS, LEVELS, POINTS)
    if reference.shape[-1] == 2:
        wh = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
        loc = reference[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
    else:
        loc = reference[:, :, None, :, None, :2] + offsets / POINTS * reference[:, :, None, :, None, 2:] * 0.5
    spatial = torch.tensor(shapes)
    start = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    out = transformers_ddetr.MultiScaleDeformableAttention().forward(value, spatial, shapes, start, loc, weights, 64)
    return lin(sd, name + ".output_proj", out)


def mha(sd, name, q_in, k_in, v_in):
    w, b = sd[name + ".in_proj_weight"], sd[name + ".in_proj_bias"]
    batch, nq, _ = q_in.shape

    def heads(x):
        return x.view(batch, -1, HEADS, D // HEADS).transpose(1, 2)

    q = heads(q_in @ w[:D].T + b[:D])
    k = heads(k_in @ w[D : 2 * D].T + b[D : 2 * D])
    v = heads(v_in @ w[2 * D :].T + b[2 * D :])
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // HEADS), -1)
    out = (attn @ v).transpose(1, 2).reshape(batch, nq, D)
    return lin(sd, name + ".out_proj", out)


def reference_forward(sd, images, mask, layer0_bug=False):
    """The original network, from the original state dict. Returns per-layer (logits, boxes)."""
    body = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    body_sd = {k[len("backbone.0.body."):]: v for k, v in sd.items() if k.startswith("backbone.0.body.")}
    missing = body.load_state_dict(body_sd, strict=False).missing_keys
    assert missing == ["fc.weight", "fc.bias"]
    with torch.no_grad():
        x = body.maxpool(body.relu(body.bn1(body.conv1(images))))
        c2 = body.layer1(x)
        c3 = body.layer2(c2)
        c4 = body.layer3(c3)
        c5 = body.layer4(c4)
    srcs = []
    for lvl, c in enumerate((c3, c4, c5)):
        y = F.conv2d(c, sd[f"input_proj.{lvl}.0.weight"], sd[f"input_proj.{lvl}.0.bias"])
        srcs.append(F.group_norm(y, 32, sd[f"input_proj.{lvl}.1.weight"], sd[f"input_proj.{lvl}.1.bias"]))
    y = F.conv2d(c5, sd["input_proj.3.0.weight"], sd["input_proj.3.0.bias"], stride=2, padding=1)
    srcs.append(F.group_norm(y, 32, sd["input_proj.3.1.weight"], sd["input_proj.3.1.bias"]))
    masks = [F.interpolate(mask[None].float(), size=s.shape[-2:]).to(torch.bool)[0] for s in srcs]
    batch = images.shape[0]
    shapes = [tuple(s.shape[-2:]) for s in srcs]
    src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
    mflat = torch.cat([m.flatten(1) for m in masks], 1)
    pos = torch.cat(
        [sine_pe(m).flatten(2).transpose(1, 2) + sd["transformer.level_embed"][lvl] for lvl, m in enumerate(masks)], 1
    )
    ratios = []
    for m in masks:
        h, w = m.shape[-2:]
        ratios.append(torch.stack([(~m[:, 0, :]).sum(1).float() / w, (~m[:, :, 0]).sum(1).float() / h], -1))
    vr = torch.stack(ratios, 1)  # [B, L, 2] (w, h)

    refs = []
    for lvl, (h, w) in enumerate(shapes):
        ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h), torch.linspace(0.5, w - 0.5, w), indexing="ij")
        refs.append(torch.stack((rx.reshape(-1)[None] / (vr[:, None, lvl, 0] * w),
                                 ry.reshape(-1)[None] / (vr[:, None, lvl, 1] * h)), -1))
    enc_ref = torch.cat(refs, 1)[:, :, None] * vr[:, None]
    memory = src
    for i in range(6):
        p = f"transformer.encoder.layers.{i}."
        memory = ln(sd, p + "norm1", memory + msda(sd, p + "self_attn", memory + pos, enc_ref, memory, shapes, mflat))
        memory = ln(sd, p + "norm2", memory + lin(sd, p + "linear2", F.relu(lin(sd, p + "linear1", memory))))

    anchors = sd["refpoint_embed.weight"].sigmoid()  # [Q, 4], unbatched as in the original
    out = sd["tgt_embed.weight"][None].repeat(batch, 1, 1)
    reference = anchors[None].repeat(batch, 1, 1)
    vr4 = torch.cat([vr, vr], -1)
    hs, inter = [], []
    for k in range(6):
        p = f"transformer.decoder.layers.{k}."
        if k == 0 and layer0_bug:
            ref_in = anchors[:, :, None] * vr4[:, None]  # [Q, 4, 1] x [B, 1, L, 4], as before 9d6f645
        else:
            ref_in = reference[:, :, None] * vr4[:, None]
        raw_pos = mlp(sd, "transformer.decoder.ref_point_head", box_sine(ref_in[:, :, 0, :]), 2)
        query_pos = raw_pos if k == 0 else mlp(sd, "transformer.decoder.query_scale", out, 2) * raw_pos
        q = out + query_pos
        out = ln(sd, p + "norm2", out + mha(sd, p + "self_attn", q, q, out))
        out = ln(sd, p + "norm1", out + msda(sd, p + "cross_attn", out + query_pos, ref_in, memory, shapes, mflat))
        out = ln(sd, p + "norm3", out + lin(sd, p + "linear2", F.relu(lin(sd, p + "linear1", out))))
        reference = (mlp(sd, f"bbox_embed.{k}", out, 3) + inv_sigmoid(reference)).sigmoid().detach()
        hs.append(out)
        inter.append(reference)
    results = []
    for k in range(6):
        start = anchors if k == 0 else inter[k - 1]
        logits = lin(sd, f"class_embed.{k}", hs[k])
        boxes = (mlp(sd, f"bbox_embed.{k}", hs[k], 3) + inv_sigmoid(start)).sigmoid()
        results.append((logits, boxes))
    return results


# ----------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def checkpoint():
    return original_state_dict()


def build_model(**transformer_overrides):
    cfg = LazyConfig.load(MODEL_CONFIG)
    for k, v in transformer_overrides.items():
        setattr(cfg.model.transformer, k, v)
    return instantiate(cfg.model).eval()


def padded_batch(sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = torch.zeros(len(sizes), 3, height, width)
    mask = torch.ones(len(sizes), height, width, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[i, :h, :w] = False
    return images, mask


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_checkpoint_layout_matches_the_released_one(checkpoint):
    """604 keys; 47,405,994 parameter elements counting the alias once, FrozenBN buffers excluded."""
    assert len(checkpoint) == 604
    seen, total = set(), 0
    for k, v in checkpoint.items():
        is_bn_buffer = k.startswith("backbone.0.body.") and (".bn" in k or "body.bn1" in k or "downsample.1" in k)
        if is_bn_buffer or id(v) in seen:
            continue
        seen.add(id(v))
        total += v.numel()
    assert total == 47_405_994


@pytest.mark.parametrize("sizes", [[(224, 160)], [(192, 256), (160, 200)]], ids=["single", "padded_batch"])
def test_converted_original_checkpoint_matches_reference(checkpoint, sizes):
    model = build_model()
    model.load_state_dict(convert_deformable_state_dict(checkpoint, "original"), strict=True)
    images, mask = padded_batch(sizes)
    with torch.no_grad():
        ours = model.predict(images, mask)
        expected = reference_forward(checkpoint, images, mask)
    ours_layers = [(a["pred_logits"], a["pred_boxes"]) for a in ours["aux_outputs"]]
    ours_layers.append((ours["pred_logits"], ours["pred_boxes"]))
    errors = []
    for (logits, boxes), (ref_logits, ref_boxes) in zip(ours_layers, expected):
        errors.append(rel_err(logits, ref_logits[..., COCO_CATEGORY_IDS]))
        errors.append(rel_err(boxes, ref_boxes))
    assert max(errors) < 1e-4, errors
    if len(sizes) == 2:
        # padding changes the answer for the padded image (valid ratios), as in the original:
        # the comparison above is therefore against the reference on the same padded batch
        alone = reference_forward(checkpoint, images[1:, :, :160, :200], mask[1:, :160, :200])
        assert rel_err(expected[-1][1][1:], alone[-1][1]) > 1e-6


def test_layer0_broadcast_bug_switch_reproduces_v1(checkpoint):
    model = build_model(layer0_broadcast_bug=True)
    model.load_state_dict(convert_deformable_state_dict(checkpoint, "original"), strict=True)
    images, mask = padded_batch([(160, 192), (128, 160)], seed=2)
    with torch.no_grad():
        ours = model.predict(images, mask)
        buggy = reference_forward(checkpoint, images, mask, layer0_bug=True)
        fixed = reference_forward(checkpoint, images, mask, layer0_bug=False)
    assert rel_err(ours["pred_boxes"], buggy[-1][1]) < 1e-4
    assert rel_err(ours["pred_logits"], buggy[-1][0][..., COCO_CATEGORY_IDS]) < 1e-4
    assert rel_err(buggy[-1][1], fixed[-1][1]) > 1e-3  # the switch matters


def test_91_class_conversion_keeps_category_id_logits(checkpoint):
    assert detect_deformable_source(checkpoint) == "original"
    converted = convert_deformable_state_dict(checkpoint, "original", coco_91_to_80=False)
    assert converted["class_embed.0.weight"].shape == (91, 256)
    converted80 = convert_deformable_state_dict(checkpoint, "original")
    torch.testing.assert_close(converted80["class_embed.3.bias"], checkpoint["class_embed.3.bias"][COCO_CATEGORY_IDS])
    assert not any(k.startswith("transformer.decoder.bbox_embed") for k in converted80)
    assert len(converted80) == 604 - 36  # only the 36 alias keys are dropped


def _convert_cli():
    from conftest import load_tool

    return load_tool("convert_checkpoint").main


def test_cli_converts_the_original_v2_checkpoint_and_it_loads_strictly(checkpoint, tmp_path, capsys):
    import argparse

    from dab_detr.checkpoint import DABDETRCheckpointer

    src, out = tmp_path / "checkpoint.pth", tmp_path / "converted.pth"
    torch.save({"model": checkpoint, "args": argparse.Namespace(lr=1e-4), "epoch": 49}, src)
    assert _convert_cli()(["--source", "original", str(src), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "configs/dab_deformable_detr_r50.py" in printed and "80 contiguous classes" in printed
    model = build_model()
    result = DABDETRCheckpointer(model).load(str(out))
    assert not result.get("incompatible") or (not result["incompatible"].missing_keys
                                              and not result["incompatible"].unexpected_keys)
    converted = torch.load(out, weights_only=True)["model"]
    assert set(converted) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, converted[k]), k
    # the wrong --source is refused, naming the right one (one message, exit status 1)
    with pytest.raises(SystemExit, match=r"^error: .* is a original DAB-Deformable-DETR checkpoint, but --source "
                                         r"is detrex; use --source original"):
        _convert_cli()(["--source", "detrex", str(src), str(out)])


def test_cli_lists_missing_and_mis_shaped_deformable_keys(checkpoint, tmp_path, capsys):
    broken = dict(checkpoint)
    del broken["transformer.level_embed"]
    broken["tgt_embed.weight"] = torch.zeros(300, 128)
    src = tmp_path / "broken.pth"
    torch.save({"model": broken}, src)
    with pytest.raises(SystemExit) as stop:  # one message, exit status 1
        _convert_cli()(["--source", "original", str(src), str(tmp_path / "out.pth")])
    err = stop.value.code
    assert err.startswith("error: cannot convert") and "1 missing key(s)" in err and "transformer.level_embed" in err
    assert "tgt_embed.weight: checkpoint (300, 128), model (300, 256)" in err
    assert not (tmp_path / "out.pth").exists()
