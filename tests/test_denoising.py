"""Query denoising (DN-DETR): the noised queries, the attention mask, the reconstruction losses,
and that a model without denoising is exactly DAB-DETR."""
import pytest
import torch
from conftest import make_inputs, small_model_config
from detectron2.config import LazyConfig, instantiate
from detectron2.utils.events import EventStorage
from torch import nn

from dab_detr.engine import LazyConfigTrainer
from dab_detr.modeling import SetCriterion, HungarianMatcher
from dab_detr.modeling.box_ops import inverse_sigmoid
from dab_detr.modeling.denoising import (
    DenoisingSettings, build_denoising_queries, denoising_attention_mask, denoising_settings, matching_content,
)
from test_custom_data import write_user_config

NO_NOISE = DenoisingSettings(groups=2, label_noise_scale=0.0, box_noise_scale=0.0)


def _targets():
    """Image 0 has two boxes, image 1 one."""
    return [
        {"labels": torch.tensor([3, 1]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.5], [0.7, 0.2, 0.4, 0.1]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.6, 0.3]])},
    ]


def _dn_model(**settings):
    torch.manual_seed(0)
    return instantiate(small_model_config(denoising={"groups": 3, **settings}))


def test_without_noise_a_denoising_query_starts_from_its_box_and_label():
    torch.manual_seed(0)
    label_enc = nn.Embedding(5 + 1, 15)
    dn = build_denoising_queries(_targets(), label_enc, NO_NOISE, num_classes=5, num_matching=4)
    # group size 2 (the largest image); box j of image k in group g sits in slot 2 g + j
    assert dn.content.shape == (2, 4, 16) and dn.anchors_logit.shape == (2, 4, 4)
    assert dn.batch_idx.tolist() == [0, 0, 1, 0, 0, 1] and dn.query_idx.tolist() == [0, 1, 0, 2, 3, 2]
    for k, target in enumerate(_targets()):
        for g in range(2):
            for j, (label, box) in enumerate(zip(target["labels"], target["boxes"])):
                slot = 2 * g + j
                assert torch.equal(dn.content[k, slot], torch.cat([label_enc.weight[label], torch.ones(1)]))
                assert torch.equal(dn.anchors_logit[k, slot], inverse_sigmoid(box))  # the original's eps 1e-3
                torch.testing.assert_close(dn.anchors_logit[k, slot].sigmoid(), box)
    # image 1 pads each group with one empty slot: zero content, anchor logit 0
    assert not dn.content[1, [1, 3]].any() and not dn.anchors_logit[1, [1, 3]].any()
    # the reconstruction targets are the clean ground truth, group-major
    assert dn.labels.tolist() == [3, 1, 2, 3, 1, 2]
    # matching queries: the "unknown" row and indicator 0
    assert torch.equal(matching_content(label_enc), torch.cat([label_enc.weight[5], torch.zeros(1)]))


def test_noise_flips_labels_and_moves_boxes_within_the_scales():
    torch.manual_seed(0)
    targets = [{"labels": torch.zeros(2000, dtype=torch.int64), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(2000, 1)}]
    label_enc = nn.Embedding(11, 7)
    settings = DenoisingSettings(groups=1, label_noise_scale=0.2, box_noise_scale=0.4)
    dn = build_denoising_queries(targets, label_enc, settings, num_classes=10, num_matching=3)
    boxes = dn.anchors_logit[0].sigmoid()
    shift = (boxes - targets[0]["boxes"]).abs()
    # centre moves by up to 0.4 x half the size, size changes by up to 0.4 x the size
    limit = torch.tensor([0.4 * 0.1, 0.4 * 0.2, 0.4 * 0.2, 0.4 * 0.4]) + 1e-6
    assert (shift <= limit).all() and (shift > 0).all()
    changed = ~torch.isclose(dn.content[0, :, :-1], label_enc.weight[0]).all(1)
    # 20 % re-drawn uniformly over 10 classes, so about 18 % actually change
    assert 0.13 < changed.float().mean() < 0.23


def test_attention_mask_blocks_for_two_images_with_different_box_counts():
    # 2 groups of 2 slots (image 0 has 2 boxes, image 1 one), then 3 matching queries; True = blocked
    o, x = False, True
    expected = torch.tensor([
        # group 0   group 1   matching
        [o, o,      x, x,     o, o, o],
        [o, o,      x, x,     o, o, o],
        [x, x,      o, o,     o, o, o],
        [x, x,      o, o,     o, o, o],
        [x, x,      x, x,     o, o, o],
        [x, x,      x, x,     o, o, o],
        [x, x,      x, x,     o, o, o],
    ])
    assert torch.equal(denoising_attention_mask(2, 2, 3), expected)
    dn = build_denoising_queries(_targets(), nn.Embedding(6, 15), NO_NOISE, num_classes=5, num_matching=3)
    assert torch.equal(dn.attn_mask, expected)
    # three groups: the middle one sees neither neighbour
    mask = denoising_attention_mask(3, 1, 1)
    assert mask[1].tolist() == [True, False, True, False]


def test_matching_queries_do_not_see_the_denoising_queries():
    model = _dn_model()
    model.train()  # dropout is 0: training and inference compute the same function
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    with torch.no_grad():
        with_dn = model.predict(images, mask, targets=_targets())
        without = model.predict(images, mask)
    assert "dn_outputs" in with_dn and "dn_outputs" not in without
    assert with_dn["pred_logits"].shape == without["pred_logits"].shape == (2, 12, 5)
    torch.testing.assert_close(with_dn["pred_logits"], without["pred_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_dn["pred_boxes"], without["pred_boxes"], rtol=1e-5, atol=1e-5)
    # 3 groups x 3 boxes, at every decoder layer
    assert with_dn["dn_outputs"]["pred_logits"].shape == (2, 9, 5)


def test_matcher_sees_only_the_matching_queries_and_inference_has_no_denoising():
    model = _dn_model()
    seen = []
    match_layers = model.criterion.matcher.match_layers

    def recording(pred_logits, pred_boxes, targets):
        seen.append(tuple(pred_logits.shape))
        return match_layers(pred_logits, pred_boxes, targets)

    model.criterion.matcher.match_layers = recording
    model.train()
    with EventStorage():
        losses = model(make_inputs([(96, 128), (128, 96)]))
    assert seen == [(2, 2, 12, 5)]  # 2 layers, 2 images, the 12 matching queries only
    suffixes = ["", "_0"]
    assert set(losses) == {f"loss_{n}{d}{s}" for n in ("class", "bbox", "giou") for d in ("", "_dn") for s in suffixes}
    assert set(model.training_metrics) == {"class_error", "class_error_dn"}

    model.eval()
    with torch.no_grad():
        outputs = model.predict(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool), targets=_targets())
        results = model(make_inputs([(64, 64)], with_targets=False))
    assert "dn_outputs" not in outputs and outputs["pred_logits"].shape == (1, 12, 5)
    assert len(results[0]["instances"]) == 12 * 5  # top (query, class) pairs of the 12 matching queries


def test_training_step_gives_finite_losses_and_trains_the_label_embedding():
    model = _dn_model()
    model.train()
    with EventStorage():
        losses = model(make_inputs([(96, 128), (128, 96)]))
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(losses[f"loss_{n}_dn"] > 0 for n in ("class", "bbox", "giou"))
    sum(losses.values()).backward()
    grad = model.label_enc.weight.grad
    # the two images' classes (0, 1 and 1, 2 before noise) and the "unknown" row (matching queries)
    assert grad[5].abs().sum() > 0 and grad[[0, 1, 2]].abs().sum(1).gt(0).all()


def test_reconstruction_losses_follow_the_original_normalization():
    criterion = SetCriterion(HungarianMatcher(), weight_dict={"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0})
    boxes = torch.tensor([[0.3, 0.4, 0.2, 0.5], [0.5, 0.5, 0.6, 0.3]])
    logits = torch.full((2, 2, 3), -20.0)  # 2 layers, 2 queries, 3 classes
    logits[:, 0, 1] = logits[:, 1, 2] = 20.0
    predicted = boxes.repeat(2, 1, 1)
    predicted[0, 0, 0] += 0.1  # layer 0, query 0: L1 0.1
    dn = {"pred_logits": logits, "pred_boxes": predicted, "labels": torch.tensor([1, 2]), "boxes": boxes}
    losses, metrics = criterion.denoising_losses(dn)
    assert losses["loss_class"].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)  # confident and right
    assert losses["loss_bbox"].tolist() == pytest.approx([0.1 / 2, 0.0], abs=1e-6)  # sum / 2 queries
    assert losses["loss_giou"][1] == pytest.approx(0.0, abs=1e-6) and losses["loss_giou"][0] > 0
    assert metrics["class_error"] == 0
    # weighted as the matching losses; no box at all gives zeros, not NaN
    empty = {"pred_logits": torch.zeros(2, 0, 3), "pred_boxes": torch.zeros(2, 0, 4),
             "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    assert all(v.eq(0).all() for v in criterion.denoising_losses(empty)[0].values())
    assert criterion.weight_dict["loss_bbox_dn"] == 5.0


def test_without_denoising_the_model_is_dab_detr():
    torch.manual_seed(0)
    plain = instantiate(small_model_config())
    assert plain.denoising is None and not any(k.startswith("label_enc") for k in plain.state_dict())
    dn = _dn_model()
    assert set(dn.state_dict()) - set(plain.state_dict()) == {"label_enc.weight"}
    assert dn.label_enc.weight.shape == (5 + 1, 64 - 1)
    assert denoising_settings({"groups": 0}).groups == 0
    with pytest.raises(ValueError, match="model.denoising: unknown settings"):
        denoising_settings({"scalar": 5})
    with pytest.raises(ValueError, match="groups must be >= 0"):
        DenoisingSettings(groups=-1)


def test_a_few_training_iterations_through_the_trainer(tmp_path):
    config_path, _, _ = write_user_config(tmp_path)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(config_path),
                                     ["model.denoising={groups:2}", "train.max_iter=3"])
    torch.manual_seed(0)
    trainer = LazyConfigTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.model.denoising == DenoisingSettings(groups=2)
    history = trainer.storage.history("loss_bbox_dn")
    assert len(history.values()) == 3 and all(torch.isfinite(torch.tensor(v)) for v, _ in history.values())
    results = LazyConfigTrainer.test(cfg, trainer.model.eval())
    assert 0.0 <= results["bbox"]["AP"] <= 100.0


def _dn_deformable(**overrides):
    from test_deformable_model import make_model

    torch.manual_seed(0)
    return make_model(depth=18, num_queries=20, **{"transformer.num_encoder_layers": 1,
                                                   "transformer.num_decoder_layers": 2, **overrides})


def test_deformable_matching_queries_do_not_see_the_denoising_queries():
    model = _dn_deformable(denoising={"groups": 2})
    # DN-DETR's deformable model keeps learned content queries: 255 values + the indicator
    assert model.tgt_embed.weight.shape == (20, 255) and model.label_enc.weight.shape == (81, 255)
    model.train()
    images = torch.rand(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    targets = [{"labels": t["labels"] + 10, "boxes": t["boxes"]} for t in _targets()]
    with torch.no_grad():
        with_dn = model.predict(images, mask, targets=targets)
        without = model.predict(images, mask)
    assert with_dn["pred_logits"].shape == without["pred_logits"].shape == (2, 20, 80)
    torch.testing.assert_close(with_dn["pred_logits"], without["pred_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_dn["pred_boxes"], without["pred_boxes"], rtol=1e-5, atol=1e-5)
    assert with_dn["dn_outputs"]["pred_boxes"].shape == (2, 2 * 3, 4)  # 2 layers, 2 groups x 3 boxes
    with pytest.raises(ValueError, match="model.denoising is implemented for the one-stage model"):
        _dn_deformable(denoising={"groups": 2}, num_patterns=3)
