"""DETRTrainLoop (gradient accumulation with micro_batch_weights, clipping) and ModelEMA, on CPU."""
import copy
import math

import pytest
import torch
from torch import nn

from detectron2.config import instantiate
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from conftest import small_model_config
from dab_detr.engine import DETRTrainLoop, EMAHook, ModelEMA, micro_batch_weights

SIZE = 64  # all images the same size: no padding, so batching cannot change the features


def _image(seed, boxes, labels):
    g = torch.Generator().manual_seed(seed)
    inst = Instances((SIZE, SIZE))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(labels, dtype=torch.long)
    return {"image": torch.randint(0, 256, (3, SIZE, SIZE), generator=g).float(),
            "file_name": f"img{seed}.png", "instances": inst}


# image A has 3 boxes, B 1 box, E none
A = _image(1, [[4, 6, 30, 40], [20, 10, 60, 30], [40, 40, 62, 63]], [0, 3, 1])
B = _image(2, [[10, 12, 50, 44]], [2])
E = _image(3, [], [])


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    model = instantiate(small_model_config(num_queries=6))  # dropout is 0 in the config
    model.train()
    return model


def _optimizer(model):
    # Adam's first step is lr * g / (|g| + eps): with the default eps 1e-8, parameters whose
    # gradient is ~1e-9 (float32 round-off level) move by up to +-lr either way, so two equal
    # gradients up to round-off could give updates 2e-4 apart. eps 1e-4 keeps the step a smooth
    # function of the gradient (error <= lr * grad_error / eps) without changing what is tested.
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4, eps=1e-4)


def _reference(base_model, images):
    """Gradients and post-AdamW-step parameters of ONE batch with all ``images``."""
    model = copy.deepcopy(base_model)
    optimizer = _optimizer(model)
    optimizer.zero_grad()
    sum(model(images).values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def _run_loop(base_model, micro_batches, **kwargs):
    """One DETRTrainLoop.run_step on a copy of the model with a fake data loader."""
    model = copy.deepcopy(base_model)
    loop = DETRTrainLoop(model, iter(micro_batches), _optimizer(model), **kwargs)
    loop.iter = 0
    with EventStorage(0) as storage:
        loop.run_step()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}, storage


def _assert_same(actual, expected, atol=1e-5, rtol=1e-4):
    assert actual.keys() == expected.keys()
    for name in expected:
        diff = (actual[name] - expected[name]).abs().max().item()
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=rtol,
                                   msg=f"{name}: max abs difference {diff:.3g}")


@pytest.mark.parametrize("images", [(A, B), (E, B)], ids=["3+1 boxes", "0+1 boxes"])
def test_accumulating_two_micro_batches_equals_one_batch(base_model, images):
    ref_grads, ref_params = _reference(base_model, list(images))
    grads, params, storage = _run_loop(base_model, [[images[0]], [images[1]]], grad_accumulation_steps=2)
    assert len(grads) > 100  # the whole model has gradients
    _assert_same(grads, ref_grads)
    _assert_same(params, ref_params)
    assert "total_loss" in storage.histories()
    assert "class_error" in storage.histories()  # the detector's diagnostics, logged by the loop


def test_accumulation_without_the_weights_would_differ(base_model):
    """Sanity of the test above: a plain average of the micro-batch losses is NOT the big batch
    when the micro-batches have different numbers of boxes (so the comparison has teeth)."""
    assert micro_batch_weights([[A], [B]]) == pytest.approx([0.75, 0.25])
    ref_grads, _ = _reference(base_model, [A, B])
    model = copy.deepcopy(base_model)
    for batch in ([A], [B]):
        (0.5 * sum(model(batch).values())).backward()
    diff = max((p.grad - ref_grads[n]).abs().max().item() for n, p in model.named_parameters()
               if p.grad is not None)
    assert diff > 1e-3


def test_micro_batch_weights_edge_cases():
    assert micro_batch_weights([[A], [B], [E]]) == pytest.approx([0.75, 0.25, 0.25])
    # no boxes anywhere: the big batch is normalized by 1, and so is each micro-batch
    assert micro_batch_weights([[E], [E]]) == pytest.approx([1.0, 1.0])
    assert micro_batch_weights([[A, B], [B]]) == pytest.approx([0.8, 0.2])


def test_accumulation_with_no_boxes_at_all(base_model):
    ref_grads, ref_params = _reference(base_model, [E, E])
    grads, params, _ = _run_loop(base_model, [[E], [E]], grad_accumulation_steps=2)
    _assert_same(grads, ref_grads)
    _assert_same(params, ref_params)


def test_logged_step_losses_are_those_of_the_big_batch(base_model):
    model = copy.deepcopy(base_model)
    with torch.no_grad():
        ref_total = sum(model([A, B]).values()).item()
    _, _, storage = _run_loop(base_model, [[A], [B]], grad_accumulation_steps=2)
    assert storage.history("total_loss").latest() == pytest.approx(ref_total, rel=1e-4)


def test_invalid_accumulation_steps(base_model):
    with pytest.raises(ValueError, match="grad_accumulation_steps"):
        DETRTrainLoop(base_model, [], _optimizer(base_model), grad_accumulation_steps=0)


# ------------------------------------------------------------------ clipping
def _total_norm(grads):
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item()


def test_clipping_bounds_the_total_gradient_norm(base_model):
    free, _, _ = _run_loop(base_model, [[A, B]], clip_grad_max_norm=0.0)
    free_norm = _total_norm(free)
    max_norm = free_norm / 10  # clipping is active
    clipped, _, _ = _run_loop(base_model, [[A, B]], clip_grad_max_norm=max_norm)
    assert _total_norm(clipped) <= max_norm * (1 + 1e-5)
    assert _total_norm(clipped) == pytest.approx(max_norm, rel=1e-4)
    for name in free:  # same direction, scaled
        torch.testing.assert_close(clipped[name], free[name] * (max_norm / free_norm), atol=1e-7, rtol=1e-4)

    # a bound above the norm leaves the gradients alone
    loose, _, _ = _run_loop(base_model, [[A, B]], clip_grad_max_norm=free_norm * 10)
    _assert_same(loose, free, atol=1e-7, rtol=1e-6)


def test_clipping_applies_to_the_accumulated_step(base_model):
    free, _, _ = _run_loop(base_model, [[A], [B]], grad_accumulation_steps=2)
    max_norm = _total_norm(free) / 5
    clipped, _, _ = _run_loop(base_model, [[A], [B]], grad_accumulation_steps=2, clip_grad_max_norm=max_norm)
    assert _total_norm(clipped) <= max_norm * (1 + 1e-5)


def test_amp_step_on_cpu_runs_in_bfloat16(base_model):
    grads, _, storage = _run_loop(base_model, [[A, B]], amp=True, clip_grad_max_norm=0.1)
    assert storage.history("total_loss").latest() > 0
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert _total_norm(grads) <= 0.1 * (1 + 1e-4)


# ------------------------------------------------------------------ EMA
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)  # has an integer buffer (num_batches_tracked)


def _set_weights(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        model.norm.running_mean.fill_(value)


def test_ema_update_matches_hand_computation():
    model = _Tiny()
    _set_weights(model, 1.0)
    ema = ModelEMA(model, decay=0.9, warmup=2)
    assert "norm.num_batches_tracked" not in ema.shadow  # integers are not averaged
    assert "norm.running_mean" in ema.shadow  # float buffers are

    expected = 1.0
    for step, value in enumerate([3.0, -2.0, 5.0], start=1):
        _set_weights(model, value)
        ema.update(model)
        decay = 0.9 * (1 - math.exp(-step / 2))
        assert ema.current_decay() == pytest.approx(decay)
        expected = decay * expected + (1 - decay) * value
        for name in ("linear.weight", "linear.bias", "norm.weight", "norm.running_mean"):
            torch.testing.assert_close(ema.shadow[name], torch.full_like(ema.shadow[name], expected))
    assert ema.updates == 3

    no_warmup = ModelEMA(model, decay=0.5, warmup=0)
    _set_weights(model, 1.0)
    no_warmup.update(model)  # shadow 5 -> 0.5 * 5 + 0.5 * 1
    torch.testing.assert_close(no_warmup.shadow["linear.bias"], torch.full((2,), 3.0))

    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, decay=1.0)


def test_ema_apply_to_swaps_and_restores():
    model = _Tiny()
    _set_weights(model, 2.0)
    ema = ModelEMA(model, decay=0.5, warmup=0)
    _set_weights(model, 4.0)
    ema.update(model)  # shadow 3.0
    model.norm.num_batches_tracked.fill_(7)
    with ema.apply_to(model):
        assert torch.all(model.linear.weight == 3.0) and torch.all(model.norm.running_mean == 3.0)
        assert model.norm.num_batches_tracked.item() == 7
    assert torch.all(model.linear.weight == 4.0) and torch.all(model.norm.running_mean == 4.0)
    # shadow unchanged and not aliased with the model
    assert torch.all(ema.shadow["linear.weight"] == 3.0)

    with pytest.raises(RuntimeError, match="boom"):
        with ema.apply_to(model):
            raise RuntimeError("boom")
    assert torch.all(model.linear.weight == 4.0)  # restored on error too


def test_ema_state_dict_round_trip_and_hook(tmp_path):
    model = _Tiny()
    _set_weights(model, 1.0)
    ema = ModelEMA(model, decay=0.8, warmup=3)
    hook = EMAHook(ema, model)
    for value in (2.0, 6.0):
        _set_weights(model, value)
        hook.after_step()
    assert ema.updates == 2

    path = tmp_path / "ema.pth"
    torch.save({"model_ema": ema.state_dict()}, path)
    state = torch.load(path, weights_only=True)["model_ema"]

    other = ModelEMA(_Tiny(), decay=0.8, warmup=3)
    other.load_state_dict(state)
    assert other.updates == 2 and other.current_decay() == pytest.approx(ema.current_decay())
    assert other.shadow.keys() == ema.shadow.keys()
    for name in ema.shadow:
        torch.testing.assert_close(other.shadow[name], ema.shadow[name])
    # continuing from the restored state gives the same as continuing the original
    ema.update(model)
    other.update(model)
    torch.testing.assert_close(other.shadow["linear.weight"], ema.shadow["linear.weight"])

    broken = {"shadow": {k: v for k, v in state["shadow"].items() if k != "linear.bias"}, "updates": 2}
    with pytest.raises(KeyError, match="linear.bias"):
        other.load_state_dict(broken)
