"""Behaviour of the DAB-DETR model: gradients, anchors, padding, configs, bad ground truth."""
import math

import pytest
import torch
from conditioning import FinitenessProbe, assert_finite_gradients, calibrate_frozen_batchnorm
from conftest import MODEL_CONFIG, make_inputs, small_model_config
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone, build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from dab_detr import add_dab_detr_config
from dab_detr.modeling import DABDETR, PositionEmbeddingSine, anchor_sine_embedding, select_top_k


def _train_step(model, inputs):
    """One training forward and backward; every activation and gradient must be finite (the
    message names the first tensor that is not)."""
    model.train()
    with EventStorage() as storage, FinitenessProbe(model) as probe:
        losses = model(inputs)
        probe.assert_finite_forward()
        total = sum(losses.values())
        total.backward()
    assert_finite_gradients(model, probe)
    return losses, storage


def _without_gradient(model):
    return {n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)}


def test_every_trainable_parameter_gets_a_gradient(small_model):
    losses, storage = _train_step(small_model, make_inputs([(96, 128), (128, 96)]))
    assert all(torch.isfinite(v) for v in losses.values())
    # At initialization exactly these get a zero gradient, as in the original: layer 0's content
    # queries are zeros (so its self-attention content weights see zero input), and the box
    # head's last layer is zero-initialized (so nothing flows to its hidden layers yet).
    assert _without_gradient(small_model) == {
        "transformer.decoder.layers.0.sa_qcontent_proj.weight",
        "transformer.decoder.layers.0.sa_kcontent_proj.weight",
        "transformer.decoder.layers.0.sa_v_proj.weight",
        "bbox_embed.layers.0.weight", "bbox_embed.layers.0.bias",
        "bbox_embed.layers.1.weight", "bbox_embed.layers.1.bias",
    }
    # With non-zero content (pattern embeddings) and a box head that has left its initialization,
    # every trainable parameter receives a gradient.
    torch.manual_seed(1)
    model = instantiate(small_model_config(**{"transformer.num_patterns": 2}))
    torch.nn.init.normal_(model.bbox_embed.layers[-1].weight, std=0.01)
    _train_step(model, make_inputs([(96, 128), (128, 96)]))
    assert _without_gradient(model) == set()
    # diagnostics are kept for the training loop to log (test_engine.py), never put in the loss dict
    assert set(model.training_metrics) == {"class_error"} and "class_error" not in losses
    assert not model.training_metrics["class_error"].requires_grad
    assert set(losses) == {f"loss_{n}{s}" for n in ("class", "bbox", "giou") for s in ["", "_0"]}


def test_anchor_path_between_layers_is_not_detached_but_next_layer_input_is(small_model):
    model = small_model.eval()
    images = torch.randn(1, 3, 64, 96)
    mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    feats = model.backbone(images)["res5"]
    m = torch.zeros(1, *feats.shape[-2:], dtype=torch.bool)
    # random box head (its last layer starts at zero, which would hide the dependence)
    torch.nn.init.normal_(model.bbox_embed.layers[-1].weight, std=0.1)
    hidden, refs = model.transformer(model.input_proj(feats), m, model.position_embedding(m), model.refpoint_embed(), model.bbox_embed)
    box_params = list(model.bbox_embed.parameters())
    # layer 1's reference is layer 0's update: differentiable w.r.t. the box head (loss of layer 1 trains layer 0's update)
    grads = torch.autograd.grad(refs[1].sum(), box_params, retain_graph=True, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    # ...but the anchors given to the next layer's attention are detached: the decoder features do
    # not depend on the box head at all
    grads = torch.autograd.grad(hidden.sum(), box_params, allow_unused=True)
    assert all(g is None for g in grads)
    del mask


def test_freeze_anchor_xy_really_freezes_the_centres():
    torch.manual_seed(0)
    model = instantiate(small_model_config(random_refpoints_xy=True, freeze_anchor_xy=True))
    before = model.refpoint_embed().detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        _train_step(model, make_inputs([(64, 64)]))
        opt.step()
    after = model.refpoint_embed().detach()
    assert torch.equal(before[:, :2], after[:, :2])
    assert not torch.equal(before[:, 2:], after[:, 2:])
    # centres are uniform in the image: inverse_sigmoid(U(0, 1))
    assert (before[:, :2].sigmoid() > 0).all() and (before[:, :2].sigmoid() < 1).all()
    # state dict keeps the original layout and round-trips into a non-frozen model
    sd = model.state_dict()
    assert sd["refpoint_embed.weight"].shape == (12, 4)
    other = instantiate(small_model_config())
    other.load_state_dict(sd)
    assert torch.equal(other.refpoint_embed.weight, after)
    model.load_state_dict(other.state_dict())
    assert torch.equal(model.refpoint_embed(), after)


def test_random_xy_without_freeze_trains_the_centres_like_the_original():
    torch.manual_seed(0)
    model = instantiate(small_model_config(random_refpoints_xy=True))
    _train_step(model, make_inputs([(64, 64)]))
    assert model.refpoint_embed.weight.grad[:, :2].abs().sum() > 0


def test_full_r50_trains_and_evaluates_on_odd_sized_images():
    torch.manual_seed(0)
    model = instantiate(LazyConfig.load(MODEL_CONFIG).model)
    inputs = make_inputs([(123, 157), (97, 141)], num_classes=80)
    inputs[1]["instances"] = inputs[1]["instances"][:0]  # an image with no annotations
    calibrate_frozen_batchnorm(model, inputs)  # a random frozen-BN ResNet does not normalize
    losses, _ = _train_step(model, inputs)
    assert len(losses) == 18 and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    inputs[0]["height"], inputs[0]["width"] = 246, 314  # report boxes at twice the size
    with torch.no_grad():
        results = model(inputs)
    inst = results[0]["instances"]
    assert inst.image_size == (246, 314) and len(inst) == 300
    assert inst.pred_classes.max() < 80 and (inst.scores[:-1] >= inst.scores[1:]).all()
    assert results[1]["instances"].image_size == (97, 141)


def test_image_without_annotations_trains_with_finite_loss(small_model):
    inputs = make_inputs([(64, 80)])
    inputs[0]["instances"] = inputs[0]["instances"][:0]
    losses, _ = _train_step(small_model, inputs)
    assert torch.isfinite(sum(losses.values()))
    assert losses["loss_bbox"] == 0 and losses["loss_class"] > 0


def test_degenerate_ground_truth_boxes_are_dropped_with_a_warning(small_model, caplog):
    inputs = make_inputs([(64, 80)])
    inst = Instances((64, 80))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 10, 10, 40],      # zero width
                                        [100.0, 70, 120, 90],    # entirely outside the image
                                        [-5.0, -5, 30, 30]]))    # partly outside: clipped, kept
    inst.gt_classes = torch.tensor([1, 2, 3])
    inputs[0]["instances"] = inst
    targets = small_model.prepare_targets(inputs, small_model.preprocess_image(inputs))
    assert targets[0]["labels"].tolist() == [3]
    assert torch.allclose(targets[0]["boxes"], torch.tensor([[15 / 80, 15 / 64, 30 / 80, 30 / 64]]))
    losses, _ = _train_step(small_model, inputs)
    assert all(torch.isfinite(v) for v in losses.values())
    assert "dropped 2 empty ground-truth box(es)" in caplog.text and "img0.jpg" in caplog.text


@pytest.mark.parametrize("box,label,message", [
    ([[10.0, float("nan"), 20, 30]], 1, "non-finite"),
    ([[10.0, 10, 20, 30]], 5, r"class ids \[5\] outside \[0, 5\)"),
])
def test_bad_ground_truth_raises_naming_the_image(small_model, box, label, message):
    inputs = make_inputs([(64, 80)])
    inst = Instances((64, 80))
    inst.gt_boxes = Boxes(torch.tensor(box))
    inst.gt_classes = torch.tensor([label])
    inputs[0]["instances"] = inst
    small_model.train()
    with pytest.raises(ValueError, match=message) as err:
        small_model(inputs)
    assert "img0.jpg" in str(err.value)


class PatchBackbone(Backbone):
    """Non-overlapping 16x16 patches: features of an image do not depend on padding around it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 32, kernel_size=16, stride=16)

    def forward(self, x):
        return {"patches": self.proj(x)}

    def output_shape(self):
        return {"patches": ShapeSpec(channels=32, stride=16)}


def test_batched_detections_equal_single_image_detections():
    torch.manual_seed(0)
    cfg = small_model_config(in_feature="patches")
    cfg.backbone = PatchBackbone()
    model = instantiate(cfg).eval()
    inputs = make_inputs([(96, 160), (160, 64), (48, 48)], with_targets=False)
    with torch.no_grad():
        batched = model(inputs)
        for item, result in zip(inputs, batched):
            alone = model([item])[0]["instances"]
            together = result["instances"]
            assert torch.allclose(alone.scores, together.scores, atol=1e-5)
            assert torch.equal(alone.pred_classes, together.pred_classes)
            assert torch.allclose(alone.pred_boxes.tensor, together.pred_boxes.tensor, atol=1e-3)


def test_position_embedding_ignores_padding_and_follows_the_formula():
    pe = PositionEmbeddingSine(num_pos_feats=8, temperature_h=20, temperature_w=10)
    mask = torch.ones(1, 5, 7, dtype=torch.bool)
    mask[0, :3, :4] = False
    padded = pe(mask)[0, :, :3, :4]
    alone = pe(torch.zeros(1, 3, 4, dtype=torch.bool))[0]
    assert torch.allclose(padded, alone, atol=1e-6)
    # channel 2 of x: sin(x_norm / 10 ** (2 * 1 / 8)) with x_norm = col / 4 * 2pi; channel 8 + 2 since y comes first
    col = 2
    x_norm = (col + 1) / (4 + 1e-6) * 2 * math.pi
    assert torch.isclose(alone[8 + 2, 0, col], torch.tensor(math.sin(x_norm / 10 ** (2 / 8))), atol=1e-6)
    y_norm = 1 / (3 + 1e-6) * 2 * math.pi
    assert torch.isclose(alone[3, 0, 0], torch.tensor(math.cos(y_norm / 20 ** (2 / 8))), atol=1e-6)


def test_anchor_sine_embedding_order_is_y_x_w_h():
    box = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    emb = anchor_sine_embedding(box, num_feats=4, temperature=10000)
    assert emb.shape == (1, 16)
    for block, value in enumerate([0.2, 0.1, 0.3, 0.4]):  # y, x, w, h
        v = value * 2 * math.pi
        expected = [math.sin(v), math.cos(v), math.sin(v / 100), math.cos(v / 100)]  # 10000 ** (2/4) = 100
        assert torch.allclose(emb[0, 4 * block: 4 * block + 4], torch.tensor(expected), atol=1e-6)


def test_top_k_decodes_query_and_class_from_the_flat_index():
    logits = torch.full((1, 3, 4), -9.0)
    logits[0, 2, 1], logits[0, 0, 3], logits[0, 2, 3] = 5.0, 4.0, 3.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1], [0.3, 0.4, 0.2, 0.4]]])
    scores, labels, xyxy = select_top_k(logits, boxes, 3)
    assert labels.tolist() == [[1, 3, 3]]
    assert torch.allclose(xyxy[0, 0], torch.tensor([0.2, 0.2, 0.4, 0.6]))
    assert torch.allclose(xyxy[0, 1], torch.tensor([0.4, 0.4, 0.6, 0.6]))
    assert torch.allclose(scores[0], torch.sigmoid(torch.tensor([5.0, 4.0, 3.0])))


def test_build_model_from_yacs_config():
    cfg = add_dab_detr_config(get_cfg())
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.DAB_DETR.update(HIDDEN_DIM=64, DIM_FEEDFORWARD=128, ENC_LAYERS=1, DEC_LAYERS=2, NUM_QUERIES=7,
                              NUM_CLASSES=3, NUM_PATTERNS=2)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert isinstance(model, DABDETR) and model.class_embed.out_features == 3
    assert model.transformer.patterns.weight.shape == (2, 64)
    model.eval()
    with torch.no_grad():
        out = model(make_inputs([(64, 64)], with_targets=False))
    # top-300 is clipped to all 14 queries (7 anchors x 2 patterns) x 3 classes
    assert len(out[0]["instances"]) == 42 and out[0]["instances"].pred_classes.max() < 3


def test_yacs_switches_the_fast_backbone_off():
    """MODEL.<detector>.FAST_BACKBONE reaches the model: False keeps Detectron2's convolutions as
    built; True (the default) runs each conv + FrozenBatchNorm2d as one FrozenBNConv2d."""
    from dab_detr.modeling.deformable import add_dab_deformable_detr_config
    from dab_detr.modeling.frozen_bn_folding import FrozenBNConv2d

    for add, node in [(add_dab_detr_config, "DAB_DETR"), (add_dab_deformable_detr_config, "DAB_DEFORMABLE_DETR")]:
        counts = {}
        for fast in (True, False):
            cfg = add(get_cfg())
            cfg.MODEL.RESNETS.DEPTH = 18
            cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
            cfg.MODEL[node].update(HIDDEN_DIM=32, DIM_FEEDFORWARD=64, ENC_LAYERS=1, DEC_LAYERS=1, FAST_BACKBONE=fast)
            cfg.MODEL.DEVICE = "cpu"
            model = build_model(cfg)
            counts[fast] = sum(isinstance(m, FrozenBNConv2d) for m in model.backbone.modules())
        assert counts[True] == 20 and counts[False] == 0, (node, counts)  # R18: 20 convs with frozen BN


def test_lazyconfig_model_instantiates_with_the_paper_size():
    model = instantiate(LazyConfig.load(MODEL_CONFIG).model)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 43.7e6) / 43.7e6 < 0.01  # SPEC: about 43.7 M (paper: 44 M)
    assert model.backbone.output_shape()["res5"].stride == 32
    frozen = {n.split(".")[1] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"stem", "res2"}  # stem and res2 frozen as the original


def test_unknown_in_feature_is_a_clear_error():
    with pytest.raises(ValueError, match="in_feature='res4' is not an output"):
        instantiate(small_model_config(in_feature="res4"))


def test_patterns_repeat_anchors_pattern_major():
    torch.manual_seed(0)
    model = instantiate(small_model_config(**{"transformer.num_patterns": 3})).eval()
    with torch.no_grad():
        out = model.predict(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert out["pred_logits"].shape == (1, 36, 5)
    # box head starts at zero, so layer-0 boxes are the anchors: query p*Q+q has anchor q
    first = out["aux_outputs"][0]["pred_boxes"][0]
    assert torch.allclose(first[:12], first[12:24]) and torch.allclose(first[:12], first[24:])
    assert torch.allclose(first[:12], model.refpoint_embed().sigmoid(), atol=1e-6)
