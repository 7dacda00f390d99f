"""The test-support module ``conditioning``: calibrated random models and finiteness messages."""
import pytest
import torch
from conditioning import EncoderConditioning, FinitenessProbe, assert_finite_gradients, calibrate_frozen_batchnorm
from conftest import make_inputs, small_model_config
from detectron2.config import instantiate
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn

SIZES = [(75, 101), (96, 70)]


def _exploding_small_model(fast_backbone=True):
    """The small test model with every backbone conv 4x too large: ~4**17 through ResNet-18."""
    torch.manual_seed(0)
    model = instantiate(small_model_config(fast_backbone=fast_backbone))
    with torch.no_grad():
        for m in model.backbone.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(4.0)
    return model


def _normalized_outputs(model, inputs):
    """Each frozen norm's output on ``inputs``, by module name (recomputed from its conv's input)."""
    outputs = {}

    def hook(name):
        def record(conv, args):
            raw = nn.functional.conv2d(args[0], conv.weight, conv.bias, conv.stride, conv.padding,
                                       conv.dilation, conv.groups)
            outputs[name] = conv.norm(raw)
        return record

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in model.backbone.named_modules()
             if isinstance(m, Conv2d) and isinstance(m.norm, FrozenBatchNorm2d)]
    with torch.no_grad():
        model.backbone(model.preprocess_image(inputs).tensor)
    for h in hooks:
        h.remove()
    return outputs


@pytest.mark.parametrize("fast_backbone", [True, False])
def test_calibration_normalizes_every_frozen_norm_and_the_encoder_input(fast_backbone):
    model = _exploding_small_model(fast_backbone)
    inputs = make_inputs(SIZES)
    with EncoderConditioning(model) as before, torch.no_grad():
        model.eval()(inputs)
    assert before.result["max_abs_encoder_input"] > 1e6  # the hazard, made certain

    assert calibrate_frozen_batchnorm(model, inputs) == 20  # stem + 8 blocks x 2 + 3 shortcuts
    outputs = _normalized_outputs(model, inputs)
    assert len(outputs) == 20
    for name, y in outputs.items():
        mean, std = y.mean((0, 2, 3)), y.std((0, 2, 3))
        assert mean.abs().max() < 1e-3, name
        # unit std, except channels (nearly) constant on this input, whose gain is capped
        assert (std - 1).abs().median() < 1e-3 and std.max() < 1 + 1e-3, name
    with EncoderConditioning(model) as after, torch.no_grad():
        model(inputs)
    assert after.result["max_abs_encoder_input"] < 20
    assert 0 < after.result["max_abs_attention_logit"] < 20
    assert 0.3 < after.result["backbone_stage_rms"]["res5"] < 5


def test_calibration_is_the_same_folded_and_unfolded():
    inputs = make_inputs(SIZES)
    folded, plain = _exploding_small_model(True), _exploding_small_model(False)
    calibrate_frozen_batchnorm(folded, inputs)
    calibrate_frozen_batchnorm(plain, inputs)
    for (name, a), b in zip(folded.backbone.named_buffers(), plain.backbone.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


class _Sqrt(nn.Module):
    def forward(self, x):
        return x.sqrt()  # finite at 0, where its gradient is infinite


def test_probe_names_the_first_module_with_a_non_finite_output():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    with torch.no_grad():
        net[1].weight[0, 0] = float("inf")
    with FinitenessProbe(net, "net") as probe:
        net(torch.ones(5, 3))
    with pytest.raises(AssertionError) as error:
        probe.assert_finite_forward()
    message = str(error.value)
    # the first in execution order (net.2 and net itself are non-finite too, later)
    assert "output of 1 (Linear)" in message and "shape [5, 2]" in message
    assert "5 non-finite of 10" in message and "max |finite value|" in message


def test_gradient_check_names_parameters_and_the_backward_origin():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), _Sqrt(), nn.Linear(4, 1))
    with torch.no_grad():
        net[0].bias.fill_(0.0)
    with FinitenessProbe(net, "net") as probe:
        net(torch.zeros(2, 3)).sum().backward()
    probe.assert_finite_forward()  # the forward is fine
    with pytest.raises(AssertionError) as error:
        assert_finite_gradients(net, probe)
    message = str(error.value)
    assert message.startswith("2 parameter(s) have non-finite gradients; first: 0.weight: shape [4, 3]")
    assert "also 0.bias" in message
    # backward order: the gradient w.r.t. the Linear's output is the first to go bad (sqrt's is finite)
    assert "gradient of output of 0 (Linear): shape [2, 4]" in message
    with pytest.raises(AssertionError, match="gradient of output of 0 "):
        probe.assert_finite_backward()


def test_finite_model_passes_every_check():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with FinitenessProbe(net) as probe:
        net(torch.randn(2, 3)).sum().backward()
    probe.assert_finite_forward()
    probe.assert_finite_backward()
    assert_finite_gradients(net, probe)
