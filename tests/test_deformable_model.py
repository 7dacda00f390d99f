"""DAB-Deformable-DETR meta-architecture: size, initialization, options, detrex conversion,
training steps and evaluation on CPU."""
import re

import pytest
import torch

from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from dab_detr.checkpoint import CheckpointError
from dab_detr.checkpoint.deformable_convert import (
    convert_deformable_state_dict,
    deformable_config_for,
    detect_deformable_source,
)
from dab_detr.modeling.deformable import DABDeformableDETR, add_dab_deformable_detr_config

MODEL_CONFIG = "configs/common/models/dab_deformable_detr_r50.py"


def make_model(depth=50, **overrides):
    """The R50 model of the config; depth=18 (and fewer queries) for faster behaviour tests."""
    cfg = LazyConfig.load(MODEL_CONFIG)
    cfg.model.backbone.stages.depth = depth
    if depth < 50:
        cfg.model.backbone.stages.stride_in_1x1 = False
    for key, value in overrides.items():
        target = cfg.model
        *path, last = key.split(".")
        for p in path:
            target = getattr(target, p)
        setattr(target, last, value)
    return instantiate(cfg.model)


def batched_inputs(with_targets=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for h, w, boxes, classes in [(128, 160, [[10, 20, 90, 100], [50, 5, 150, 60]], [3, 17]),
                                 (112, 144, [[0, 0, 60, 112]], [79])]:
        x = {"image": torch.rand(3, h, w, generator=g) * 255, "height": 2 * h, "width": 2 * w}
        if with_targets:
            inst = Instances((h, w))
            inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
            inst.gt_classes = torch.tensor(classes)
            x["instances"] = inst
        inputs.append(x)
    return inputs


def test_parameter_count_matches_the_released_checkpoint():
    model = make_model(num_classes=91)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == 47_405_994  # SPEC-deformable 4.2 (FrozenBN statistics are buffers)
    assert trainable == 47_183_594  # stem and res2 frozen


def test_initialization_follows_the_original():
    torch.manual_seed(0)
    model = make_model(depth=18)
    assert len(model.class_embed) == len(model.bbox_embed) == 6
    assert len({id(m) for m in model.bbox_embed}) == 6  # independent heads, no sharing
    torch.testing.assert_close(model.bbox_embed[0].layers[-1].bias, torch.tensor([0.0, 0.0, -2.0, -2.0]))
    for head in model.bbox_embed[1:]:
        assert torch.count_nonzero(head.layers[-1].bias) == 0
        assert torch.count_nonzero(head.layers[-1].weight) == 0
    for head in model.class_embed:
        torch.testing.assert_close(head.bias, torch.full((80,), -4.59512), atol=1e-4, rtol=0)
    torch.testing.assert_close(model.class_embed[2].weight, model.class_embed[4].weight)  # deep copies
    assert model.tgt_embed.weight.std().item() == pytest.approx(1.0, abs=0.05)  # N(0, 1)
    enc_attn = model.transformer.encoder.layers[0].self_attn
    assert torch.count_nonzero(enc_attn.attention_weights.weight) == 0
    two_stage = make_model(depth=18, **{"transformer.two_stage": True})
    assert len(two_stage.class_embed) == 7 and not hasattr(two_stage, "tgt_embed")
    assert all(torch.count_nonzero(h.layers[-1].bias) == 0 for h in two_stage.bbox_embed)


def test_train_step_and_evaluation():
    torch.manual_seed(0)
    model = make_model(depth=18, num_queries=100)
    model.train()
    losses = model(batched_inputs())
    expected = {f"loss_{n}{s}" for n in ("class", "bbox", "giou") for s in ["", "_0", "_1", "_2", "_3", "_4"]}
    assert set(losses) == expected
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    assert model.refpoint_embed.weight.grad.abs().sum() > 0
    assert model.tgt_embed.weight.grad.abs().sum() > 0
    assert model.transformer.encoder.layers[0].self_attn.sampling_offsets.weight.grad.abs().sum() > 0
    assert model.backbone.stem.conv1.weight.grad is None  # frozen stem

    model.eval()
    with torch.no_grad():
        results = model(batched_inputs(with_targets=False))
    inst = results[0]["instances"]
    assert len(inst) == 100  # top-100 of the original
    assert inst.image_size == (256, 320)
    assert inst.scores.shape == (100,) and bool((inst.scores[:-1] >= inst.scores[1:]).all())
    assert int(inst.pred_classes.max()) < 80


def test_two_stage_train_step_has_encoder_losses():
    torch.manual_seed(0)
    model = make_model(depth=18, num_queries=100, **{"transformer.two_stage": True})
    model.train()
    losses = model(batched_inputs())
    assert {"loss_class_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(losses)
    sum(losses.values()).backward()
    assert model.transformer.enc_output.weight.grad.abs().sum() > 0
    assert model.class_embed[6].weight.grad.abs().sum() > 0  # proposal head
    model.eval()
    with torch.no_grad():
        images = torch.randn(2, 3, 160, 192)
        mask = torch.zeros(2, 160, 192, dtype=torch.bool)
        mask[1, 120:] = True
        out = model.predict(images, mask)
        with pytest.raises(ValueError, match="encoder tokens"):  # 41 tokens < 100 proposals
            model.predict(images[:, :, :32, :64], mask[:, :32, :64])
    assert out["pred_boxes"].shape == (2, 100, 4) and out["enc_outputs"]["pred_boxes"].shape == (2, 100, 4)
    # the decoder starts from the proposals: layer 0 refines the selected proposal boxes
    assert torch.isfinite(out["enc_outputs"]["pred_boxes"]).all()


def test_patterns_tile_anchors_pattern_major():
    model = make_model(depth=18, num_queries=50, num_patterns=3)
    content, anchors = model.queries()
    assert content.shape == (150, 256) and anchors.shape == (150, 4)
    torch.testing.assert_close(anchors[50:100], model.refpoint_embed.weight)
    torch.testing.assert_close(content[50 + 7], model.tgt_embed.weight[7] + model.patterns_embed.weight[1])
    model.eval()
    with torch.no_grad():
        out = model.predict(torch.randn(1, 3, 96, 96), torch.zeros(1, 96, 96, dtype=torch.bool))
    assert out["pred_logits"].shape == (1, 150, 80)


@pytest.mark.parametrize("freeze", [False, True])
def test_random_xy_anchors_freeze_switch(freeze):
    torch.manual_seed(0)
    model = make_model(depth=18, num_queries=50, random_refpoints_xy=True, freeze_anchor_xy=freeze)
    model.train()
    before = model.refpoint_embed().detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    sum(model(batched_inputs()).values()).backward()
    optimizer.step()
    after = model.refpoint_embed().detach()
    moved_xy = not torch.equal(before[:, :2], after[:, :2])
    assert moved_xy != freeze  # without the switch the centres train, as in the original
    assert not torch.equal(before[:, 2:], after[:, 2:])


def _to_detrex_names(state_dict):
    """Our names -> detrex's (projects/dab_deformable_detr), written out from SPEC-deformable 4.4."""
    rules = [
        (r"^input_proj\.([0-2])\.0\.", r"neck.convs.\1.conv."),
        (r"^input_proj\.([0-2])\.1\.", r"neck.convs.\1.norm."),
        (r"^input_proj\.3\.0\.", "neck.extra_convs.0.conv."),
        (r"^input_proj\.3\.1\.", "neck.extra_convs.0.norm."),
        (r"^transformer\.level_embed$", "transformer.level_embeds"),
        (r"^(transformer\.encoder\.layers\.\d+)\.self_attn\.", r"\1.attentions.0."),
        (r"^(transformer\.encoder\.layers\.\d+)\.norm1\.", r"\1.norms.0."),
        (r"^(transformer\.encoder\.layers\.\d+)\.norm2\.", r"\1.norms.1."),
        (r"^(transformer\.decoder\.layers\.\d+)\.self_attn\.", r"\1.attentions.0.attn."),
        (r"^(transformer\.decoder\.layers\.\d+)\.cross_attn\.", r"\1.attentions.1."),
        (r"^(transformer\.decoder\.layers\.\d+)\.norm2\.", r"\1.norms.0."),
        (r"^(transformer\.decoder\.layers\.\d+)\.norm1\.", r"\1.norms.1."),
        (r"^(transformer\.decoder\.layers\.\d+)\.norm3\.", r"\1.norms.2."),
        (r"^(transformer\.\w+coder\.layers\.\d+)\.linear1\.", r"\1.ffns.0.layers.0.0."),
        (r"^(transformer\.\w+coder\.layers\.\d+)\.linear2\.", r"\1.ffns.0.layers.1."),
    ]
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, new)
            if n:
                break
        out[new] = value
        if key.startswith(("bbox_embed.", "class_embed.")):
            out["transformer.decoder." + key] = value  # detrex saves the head lists twice too
    return out


@pytest.mark.parametrize("two_stage", [False, True], ids=["one_stage", "two_stage"])
def test_detrex_checkpoint_converts_and_reproduces_outputs(two_stage):
    torch.manual_seed(0)
    source = make_model(depth=18, num_queries=100, **{"transformer.two_stage": two_stage}).eval()
    for p in source.parameters():  # away from the structured init, so that every tensor matters
        p.data.add_(0.02 * torch.randn_like(p))
    detrex_sd = _to_detrex_names(source.state_dict())
    assert detect_deformable_source(detrex_sd) == "detrex"
    if two_stage:
        assert "transformer.enc_output.weight" in detrex_sd and "transformer.decoder.class_embed.6.bias" in detrex_sd
    target = make_model(depth=18, num_queries=100, **{"transformer.two_stage": two_stage}).eval()
    converted = convert_deformable_state_dict(detrex_sd, "detrex")
    assert deformable_config_for(converted).endswith("two_stage.py") == two_stage
    target.load_state_dict(converted, strict=True)
    images = torch.randn(2, 3, 160, 192)
    mask = torch.zeros(2, 160, 192, dtype=torch.bool)
    mask[0, :, 150:] = True
    with torch.no_grad():
        expected, got = source.predict(images, mask), target.predict(images, mask)
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"])
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"])


def test_converter_errors_name_the_problem():
    with pytest.raises(CheckpointError, match="source"):
        convert_deformable_state_dict({}, "mmdet")
    with pytest.raises(CheckpointError, match="transformer.foo"):
        convert_deformable_state_dict(
            {"transformer.level_embeds": torch.zeros(4, 256), "transformer.foo": torch.zeros(1)}, "detrex"
        )
    with pytest.raises(CheckpointError, match="backbone.0.body.layer9"):
        convert_deformable_state_dict({"backbone.0.body.layer9.0.conv1.weight": torch.zeros(1)}, "original")
    with pytest.raises(CheckpointError, match="two-stage"):
        convert_deformable_state_dict({"transformer.pos_trans.weight": torch.zeros(512, 512)}, "original")
    bad_alias = {"bbox_embed.0.layers.0.bias": torch.zeros(256),
                 "transformer.decoder.bbox_embed.0.layers.0.bias": torch.ones(256)}
    with pytest.raises(CheckpointError, match="differs"):
        convert_deformable_state_dict(bad_alias, "original")


def test_options_that_cannot_combine_raise():
    with pytest.raises(ValueError, match="two-stage"):
        make_model(depth=18, num_patterns=2, **{"transformer.two_stage": True})
    with pytest.raises(ValueError, match="in_features"):
        make_model(depth=18, in_features=["res3", "res6"])
    with pytest.raises(ValueError, match="layer0_broadcast_bug"):
        make_model(depth=18, **{"transformer.two_stage": True, "transformer.layer0_broadcast_bug": True})


def test_yacs_build_model():
    cfg = add_dab_deformable_detr_config(get_cfg())
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.DAB_DEFORMABLE_DETR.NUM_PATTERNS = 2
    model = build_model(cfg)
    assert isinstance(model, DABDeformableDETR)
    assert model.queries()[1].shape == (600, 4) and model.select_box_nums_for_evaluation == 100
