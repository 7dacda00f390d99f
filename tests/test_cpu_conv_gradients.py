"""``cpu_conv_gradients.conv2d``: PyTorch's convolution with another choice of CPU kernels in the
backward. Same output, same gradients (to float rounding) as ``F.conv2d``, for every kind of
convolution the backbones have, and it steps aside where it does not apply."""
import pytest
import torch
from torch.nn import functional as F

from dab_detr.modeling.cpu_conv_gradients import conv2d, use_cpu_conv_gradients

# (c_in, c_out, kernel, stride, padding, dilation): ResNet's 1x1 / strided 1x1 shortcut / 3x3 /
# strided 3x3, DC5's dilated 3x3, the stem's 7x7
KINDS = [
    (16, 24, 1, 1, 0, 1),
    (16, 24, 1, 2, 0, 1),
    (16, 16, 3, 1, 1, 1),
    (16, 16, 3, 2, 1, 1),
    (16, 16, 3, 1, 2, 2),
    (3, 8, 7, 2, 3, 1),
]


def _grads(fn, x, weight, bias, grad_out):
    for t in (x, weight, bias):
        if t is not None:
            t.grad = None
    y = fn(x, weight, bias)
    y.backward(grad_out)
    return y.detach(), [None if t is None or t.grad is None else t.grad.clone() for t in (x, weight, bias)]


@pytest.mark.parametrize("kind", KINDS, ids=["1x1", "1x1-s2", "3x3", "3x3-s2", "3x3-d2", "7x7-s2"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("input_grad", [True, False], ids=["input-grad", "frozen-input"])
def test_same_output_and_gradients_as_pytorch(kind, with_bias, input_grad):
    c_in, c_out, k, s, p, d = kind
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c_in, 19, 23, generator=g).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(input_grad)
    weight = torch.randn(c_out, c_in, k, k, generator=g).contiguous(memory_format=torch.channels_last)
    weight.requires_grad_()
    bias = torch.randn(c_out, generator=g).requires_grad_() if with_bias else None
    assert use_cpu_conv_gradients(x, weight)
    grad_out = torch.randn_like(F.conv2d(x, weight, bias, s, p, d))

    y_ref, ref = _grads(lambda a, w, b: F.conv2d(a, w, b, s, p, d), x, weight, bias, grad_out)
    y, got = _grads(lambda a, w, b: conv2d(a, w, b, (s, s), (p, p), (d, d)), x, weight, bias, grad_out)
    assert torch.equal(y, y_ref)  # the forward is F.conv2d itself
    for name, a, b in zip(("input", "weight", "bias"), ref, got):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape, name
            assert (a - b).abs().max() <= 1e-5 * a.abs().max(), name
    # the weight gradient keeps the weight's layout (optimizer states follow the parameter)
    assert got[1].is_contiguous(memory_format=torch.channels_last)


def test_it_steps_aside_where_it_does_not_apply():
    x = torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    assert use_cpu_conv_gradients(x, w)
    assert not use_cpu_conv_gradients(x.contiguous(), w)  # NCHW input: PyTorch's kernels
    assert not use_cpu_conv_gradients(x.double(), w.double())  # float32 only
    assert not use_cpu_conv_gradients(x, w.detach())  # nothing to differentiate
    with torch.no_grad():
        assert not use_cpu_conv_gradients(x, w)  # inference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_cpu_conv_gradients(x, w)  # AMP: autocast's own casts
        y = conv2d(x, w, None, (1, 1), (1, 1))
    assert y.dtype == torch.bfloat16 and y.grad_fn.name() == "ConvolutionBackward0"
    y = conv2d(x, w, None, (1, 1), (1, 1))
    assert y.grad_fn.name() == "_Conv2dCPUBackward"
