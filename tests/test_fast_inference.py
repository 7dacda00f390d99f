"""The fast backbone path (frozen BN folded into the convolutions, channels_last conv weights)
computes the same model as the plain path: same detections, same losses and gradients, same
checkpoint layout, for DAB-DETR and DAB-Deformable-DETR."""
import pytest
import torch
from conftest import make_inputs, small_model_config
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.utils.events import EventStorage

from dab_detr.modeling.frozen_bn_folding import FrozenBNConv2d, fold_frozen_batchnorm

DEFORMABLE_CONFIG = "configs/common/models/dab_deformable_detr_r50.py"
SCORE_ATOL, BOX_ATOL_PX = 1e-4, 1e-2


def _dab_detr(fast):
    cfg = small_model_config()
    cfg.backbone.freeze_at = 2  # the COCO configs' frozen stem and res2
    cfg.fast_backbone = fast
    return instantiate(cfg)


def _deformable(fast):
    cfg = LazyConfig.load(DEFORMABLE_CONFIG).model
    cfg.backbone.stages.depth = 18
    cfg.num_queries = 20
    cfg.transformer.update(num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=128)
    cfg.fast_backbone = fast
    return instantiate(cfg)


def _randomize_frozen_bn(model, seed=0):
    """Non-trivial frozen statistics (a fresh model has mean 0, var 1: the fold would be ~identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.numel()
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def _pair(build):
    torch.manual_seed(0)
    plain = build(False)
    _randomize_frozen_bn(plain)
    fast = build(True)
    fast.load_state_dict(plain.state_dict())  # a checkpoint of the plain model loads as is
    return plain.eval(), fast.eval()


def _assert_same_detections(plain, fast, inputs):
    with torch.no_grad():
        a, b = plain(inputs), fast(inputs)
    for x, y in zip(a, b):
        x, y = x["instances"], y["instances"]
        assert len(x) == len(y) > 0
        assert torch.equal(x.pred_classes, y.pred_classes)
        assert (x.scores - y.scores).abs().max() < SCORE_ATOL
        assert (x.pred_boxes.tensor - y.pred_boxes.tensor).abs().max() < BOX_ATOL_PX


@pytest.mark.parametrize("build", [_dab_detr, _deformable], ids=["dab_detr", "dab_deformable_detr"])
def test_fast_path_gives_the_same_detections(build):
    plain, fast = _pair(build)
    folded = [m for m in fast.backbone.modules() if isinstance(m, FrozenBNConv2d)]
    assert folded and not any(isinstance(m, FrozenBNConv2d) for m in plain.modules())
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in folded)
    assert set(fast.state_dict()) == set(plain.state_dict())  # checkpoint layout unchanged
    inputs = make_inputs([(96, 128), (80, 112)], with_targets=False)
    _assert_same_detections(plain, fast, inputs)
    # the folded weights are cached at inference; loading new weights must invalidate the cache
    state = plain.state_dict()
    conv = "backbone.res3.0.conv1"
    state[f"{conv}.weight"] = state[f"{conv}.weight"] * 1.5
    state[f"{conv}.norm.running_var"] = state[f"{conv}.norm.running_var"] * 2.0
    plain.load_state_dict(state)
    fast.load_state_dict(state)
    _assert_same_detections(plain, fast, inputs)


def test_fast_path_trains_the_same_function():
    plain, fast = _pair(_dab_detr)
    plain.train(), fast.train()
    inputs = make_inputs([(96, 128), (80, 112)])
    grads = []
    for model in (plain, fast):
        with EventStorage():
            losses = model(inputs)
        sum(losses.values()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        grads[-1]["loss"] = sum(losses.values()).detach()
    assert abs(grads[0]["loss"] - grads[1]["loss"]) < 1e-4 * abs(grads[0]["loss"])
    assert set(grads[0]) == set(grads[1])
    # the reparametrized convolutions pass the gradient to the same weight tensors
    for name in ("backbone.res3.0.conv1.weight", "backbone.res4.0.conv2.weight", "input_proj.weight"):
        a, b = grads[0][name], grads[1][name]
        assert (a - b).abs().max() <= 1e-4 * a.abs().max(), name


def test_fold_replaces_only_frozen_bn_convs_and_shares_parameters():
    net = torch.nn.Sequential(
        Conv2d(3, 4, 3, padding=1, norm=FrozenBatchNorm2d(4), activation=torch.nn.ReLU()),
        Conv2d(4, 4, 1, bias=True, norm=FrozenBatchNorm2d(4)),
        Conv2d(4, 2, 1, norm=torch.nn.BatchNorm2d(2)),  # trainable BN: not folded
    ).eval()
    _randomize_frozen_bn(net, seed=1)
    torch.nn.init.normal_(net[1].bias)
    weights = [m.weight for m in net]
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        expected = net(x)
        assert fold_frozen_batchnorm(net) == 2
        assert [type(m) for m in net] == [FrozenBNConv2d, FrozenBNConv2d, Conv2d]
        assert all(a is m.weight for a, m in zip(weights, net))  # same Parameter objects
        assert torch.allclose(net(x), expected, rtol=1e-5, atol=1e-6)


def test_fold_refuses_a_conv_without_frozen_bn():
    with pytest.raises(TypeError, match="FrozenBatchNorm2d"):
        FrozenBNConv2d(3, 4, 1, norm=torch.nn.BatchNorm2d(4))


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_fast_path_runs_under_autocast(dtype):
    """Mixed precision (bf16 on CPU; fp16 uses the same autocast path on CUDA): the folded
    weights are cast by autocast like any convolution weight, detections stay close to fp32."""
    plain, fast = _pair(_dab_detr)
    inputs = make_inputs([(96, 128)], with_targets=False)
    with torch.no_grad():
        reference = plain(inputs)[0]["instances"]
        with torch.autocast("cpu", dtype=dtype):
            mixed = fast(inputs)[0]["instances"]
    assert len(mixed) == len(reference) and torch.isfinite(mixed.scores).all()
    assert (mixed.scores.sort().values - reference.scores.sort().values).abs().max() < 0.05


def test_unpadded_batch_attends_without_a_mask_and_gives_the_same_outputs():
    """A batch whose images fill the padded tensor needs no attention mask: the forward skips it
    (decided from the Python image sizes) and computes the same outputs as with the mask."""
    torch.manual_seed(0)
    model = _dab_detr(True).eval()
    inputs = make_inputs([(96, 128), (96, 128)], with_targets=False)  # divisible by 32: no padding
    images = model.preprocess_image(inputs)
    assert not model.has_padding(images)
    assert model.has_padding(model.preprocess_image(make_inputs([(96, 128), (80, 112)], with_targets=False)))
    mask = model.padding_mask(images)
    seen = []
    hook = model.transformer.register_forward_pre_hook(lambda _m, args: seen.append(args[1]))
    with torch.no_grad():
        masked = model.predict(images.tensor, mask, padded=True)
        unmasked = model.predict(images.tensor, mask, padded=False)
        model(inputs)
    hook.remove()
    assert seen[0] is not None and seen[1] is None and seen[2] is None  # forward took the unmasked path
    for key in ("pred_logits", "pred_boxes"):
        assert (masked[key] - unmasked[key]).abs().max() < 1e-5
