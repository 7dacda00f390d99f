import pytest
import torch

from dab_detr.modeling import HungarianMatcher, SetCriterion


def _random_targets(g, sizes, num_classes):
    targets = []
    for n in sizes:
        xy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=g),
                        "boxes": torch.cat([xy, wh], 1)})
    return targets


def test_batched_matching_equals_per_image_matching():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 20, 7, generator=g)
    boxes = torch.rand(3, 20, 4, generator=g) * 0.5 + 0.25
    targets = _random_targets(g, [4, 0, 9], 7)
    matcher = HungarianMatcher()
    batched = matcher(logits, boxes, targets)
    for i in range(3):
        (q, t), = matcher(logits[i:i + 1], boxes[i:i + 1], targets[i:i + 1])
        assert torch.equal(batched[i][0], q) and torch.equal(batched[i][1], t)
        n = len(targets[i]["labels"])
        assert len(q) == min(20, n)
        assert len(set(q.tolist())) == len(q) and len(set(t.tolist())) == len(t)


def test_matching_minimizes_the_cost():
    g = torch.Generator().manual_seed(1)
    logits, boxes = torch.randn(1, 6, 3, generator=g), torch.rand(1, 6, 4, generator=g) * 0.5 + 0.25
    target = _random_targets(g, [3], 3)
    matcher = HungarianMatcher()
    (q, t), = matcher(logits, boxes, target)
    cost = matcher.cost_matrix(logits[0], boxes[0], target[0])
    best = cost[q, t].sum()
    import itertools
    for perm in itertools.permutations(range(6), 3):  # brute force over all assignments
        assert best <= cost[list(perm), [0, 1, 2]].sum() + 1e-5


def test_empty_targets_give_empty_matches_and_finite_loss():
    logits = torch.randn(2, 10, 4, requires_grad=True)
    boxes = torch.rand(2, 10, 4).requires_grad_()
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    matches = HungarianMatcher()(logits, boxes, targets)
    assert all(len(q) == 0 and len(t) == 0 for q, t in matches)
    losses, _ = SetCriterion(HungarianMatcher())({"pred_logits": logits, "pred_boxes": boxes}, targets)
    total = sum(losses.values())
    assert torch.isfinite(total) and losses["loss_class"] > 0
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0
    total.backward()
    assert logits.grad.abs().sum() > 0  # every query is pushed towards "no object"


def test_perfect_prediction_matches_itself_with_zero_box_losses():
    g = torch.Generator().manual_seed(2)
    target = _random_targets(g, [5], 4)[0]
    perm = torch.tensor([3, 0, 4, 1, 2])
    boxes = torch.rand(1, 8, 4) * 0.5 + 0.25
    logits = torch.full((1, 8, 4), -10.0)
    boxes[0, perm] = target["boxes"]
    logits[0, perm, target["labels"]] = 10.0
    (q, t), = HungarianMatcher()(logits, boxes, [target])
    assert torch.equal(perm[t], q)  # query perm[j] got target j
    losses, metrics = SetCriterion(HungarianMatcher())({"pred_logits": logits, "pred_boxes": boxes}, [target])
    assert losses["loss_bbox"].abs() < 1e-6 and losses["loss_giou"].abs() < 1e-6
    assert metrics["class_error"] == 0


def test_focal_cost_matches_the_spec_formula():
    p = torch.tensor([[0.3, 0.8]])
    logits = torch.logit(p)
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    m = HungarianMatcher(cost_class=1.0, cost_bbox=0.0, cost_giou=0.0)
    got = m.cost_matrix(logits[0:1].expand(1, 2), torch.tensor([[0.5, 0.5, 0.2, 0.2]]), target)
    pt = torch.tensor(0.8)
    expected = 0.25 * (1 - pt) ** 2 * -torch.log(pt + 1e-8) - 0.75 * pt**2 * -torch.log(1 - pt + 1e-8)
    assert torch.allclose(got[0, 0], expected, atol=1e-6)


def test_non_finite_predictions_raise_a_clear_error():
    boxes = torch.rand(1, 4, 4)
    boxes[0, 1] = float("nan")
    target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    with pytest.raises(FloatingPointError, match="not finite"):
        HungarianMatcher()(torch.randn(1, 4, 2), boxes, [target])


def test_criterion_weights_and_aux_suffixes():
    g = torch.Generator().manual_seed(3)
    out = {"pred_logits": torch.randn(1, 6, 3, generator=g), "pred_boxes": torch.rand(1, 6, 4, generator=g) * 0.5 + 0.2}
    out["aux_outputs"] = [dict(out), dict(out)]
    out["enc_outputs"] = dict(out)
    targets = _random_targets(g, [2], 3)
    unweighted, _ = SetCriterion(HungarianMatcher(), weight_dict={"loss_class": 1, "loss_bbox": 1, "loss_giou": 1})(out, targets)
    weighted, _ = SetCriterion(HungarianMatcher())(out, targets)
    assert set(weighted) == {f"loss_{n}{s}" for n in ("class", "bbox", "giou") for s in ("", "_0", "_1", "_enc")}
    for suffix in ("", "_0", "_1", "_enc"):
        assert torch.allclose(weighted["loss_bbox" + suffix], 5 * unweighted["loss_bbox" + suffix])
        assert torch.allclose(weighted["loss_giou" + suffix], 2 * unweighted["loss_giou" + suffix])
    with pytest.raises(ValueError, match="loss_clas"):
        SetCriterion(HungarianMatcher(), weight_dict={"loss_clas": 1.0})


def _per_layer_reference_losses(matcher, out, targets, num_boxes):
    """The set loss written out one output at a time, as the original code computes it (focal loss
    summed, L1 summed, the diagonal of the pairwise GIoU matrix): the reference of the batched
    ``SetCriterion``."""
    from torch.nn import functional as F
    from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

    logits, boxes = out["pred_logits"], out["pred_boxes"]
    indices = matcher(logits, boxes, targets)
    batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])
    query_idx = torch.cat([q for q, _ in indices])
    labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
    tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
    onehot = torch.zeros_like(logits)
    onehot[batch_idx, query_idx, labels] = 1.0
    src = boxes[batch_idx, query_idx]
    giou = torch.diag(generalized_box_iou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy")))
    return {
        "loss_class": sigmoid_focal_loss(logits, onehot, alpha=0.25, gamma=2.0, reduction="sum") / num_boxes,
        "loss_bbox": F.l1_loss(src, tgt, reduction="sum") / num_boxes,
        "loss_giou": (1 - giou).sum() / num_boxes,
    }


def test_layers_matched_together_equal_layers_matched_alone():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 3, 20, 7, generator=g)
    boxes = torch.rand(4, 3, 20, 4, generator=g) * 0.5 + 0.25
    targets = _random_targets(g, [4, 0, 9], 7)
    matcher = HungarianMatcher()
    together = matcher.match_layers(logits, boxes, targets)
    for layer in range(4):
        alone = matcher(logits[layer], boxes[layer], targets)
        for (q1, t1), (q2, t2) in zip(together[layer], alone):
            assert torch.equal(q1, q2) and torch.equal(t1, t2)
    # the batched cost is the per-image cost, bit for bit
    big = matcher.pairwise_cost(logits[0, 2], boxes[0, 2], torch.cat([t["labels"] for t in targets]),
                                torch.cat([t["boxes"] for t in targets]))
    assert torch.equal(big[:, 4:], matcher.cost_matrix(logits[0, 2], boxes[0, 2], targets[2]))


def test_batched_set_loss_equals_the_loss_of_each_output_alone():
    """All decoder layers' losses computed in one pass equal the original's per-output losses."""
    g = torch.Generator().manual_seed(5)
    layers = [{"pred_logits": torch.randn(3, 20, 7, generator=g).requires_grad_(),
               "pred_boxes": (torch.rand(3, 20, 4, generator=g) * 0.5 + 0.25).requires_grad_()} for _ in range(4)]
    out = dict(layers[-1], aux_outputs=layers[:-1])
    targets = _random_targets(g, [4, 0, 9], 7)
    matcher = HungarianMatcher()
    losses, _ = SetCriterion(matcher, weight_dict={"loss_class": 1, "loss_bbox": 1, "loss_giou": 1})(out, targets)
    for suffix, layer in zip(["_0", "_1", "_2", ""], layers):
        expected = _per_layer_reference_losses(matcher, layer, targets, num_boxes=13.0)
        for name, value in expected.items():
            assert abs(losses[name + suffix] - value) <= 1e-6 * abs(value), name + suffix
    # and so do the gradients
    total = sum(losses.values())
    grads = torch.autograd.grad(total, [layers[1]["pred_logits"], layers[1]["pred_boxes"]])
    expected = sum(_per_layer_reference_losses(matcher, layers[1], targets, 13.0).values())
    grads_ref = torch.autograd.grad(expected, [layers[1]["pred_logits"], layers[1]["pred_boxes"]])
    for a, b in zip(grads, grads_ref):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()
