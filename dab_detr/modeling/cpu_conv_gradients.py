"""A 2-D convolution whose backward picks, per gradient, the faster CPU kernel.

On CPU, oneDNN runs the *forward* convolution fastest in NHWC (``channels_last``), which is why the
backbone keeps its weights in that layout (``frozen_bn_folding``). Its backward in NHWC is uneven:
the input gradient is fast, but the weight gradient of a 3x3 convolution is 1.5-3x slower than the
same kernel in NCHW, and the weight gradient of a 1x1 convolution is a plain matrix product that
MKL's GEMM does faster than oneDNN. Measured on 2 cores (AVX2) over every convolution shape of a
ResNet-50 trunk at 800x1216, forward + backward: 2.38 s with PyTorch's kernels, 1.91 s here.

``conv2d`` computes exactly the same function (forward is ``F.conv2d``); its gradients agree
with PyTorch's to float rounding (~1e-6 relative: another summation order):

* input gradient: oneDNN NHWC (PyTorch's own kernel);
* weight gradient of a 1x1 convolution (no padding, one group): ``grad_out^T @ input`` as one
  GEMM on the NHWC tensors (strided inputs are sliced first: no copy of the data in NHWC);
* weight gradient of any other convolution: oneDNN in NCHW, after converting the two operands
  (a memory-bound copy, a few ms against tens of ms saved);
* bias gradient: a sum over batch and space.

It is used only where it helps: CPU, float32, NHWC input, autograd on, autocast off, not while
tracing or compiling (``use_cpu_conv_gradients``). Everywhere else (CUDA, AMP, export, inference)
callers use ``F.conv2d`` itself.
"""
from typing import Optional, Sequence

import torch
from torch.nn import functional as F

__all__ = ["conv2d", "use_cpu_conv_gradients"]

_aten = torch.ops.aten


def use_cpu_conv_gradients(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when ``conv2d`` is faster than ``F.conv2d`` for this call (see the module docstring)."""
    return (
        torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and (weight.requires_grad or x.requires_grad)
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()
    )


class _Conv2dCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.config = (tuple(stride), tuple(padding), tuple(dilation), groups, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.config
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        grad_input = grad_weight = grad_bias = None
        if need_input:
            grad_input = _aten.convolution_backward(
                grad_out, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [True, False, False]
            )[0]
        if need_weight:
            if weight.shape[2:] == (1, 1) and padding == (0, 0) and groups == 1:
                grad_weight = _pointwise_weight_grad(grad_out, x, stride, weight)
            else:
                grad_weight = _aten.convolution_backward(
                    grad_out.contiguous(), x.contiguous(), weight.contiguous(), None, stride, padding, dilation,
                    False, [0, 0], groups, [False, True, False],
                )[1]
                grad_weight = grad_weight.contiguous(memory_format=torch.channels_last)
        if need_bias and has_bias:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_input, grad_weight, grad_bias, None, None, None, None


def _pointwise_weight_grad(grad_out, x, stride, weight):
    """Weight gradient of a 1x1 convolution: [C_out, N*H'*W'] @ [N*H'*W', C_in] (NHWC views)."""
    if stride != (1, 1):
        x = x[:, :, :: stride[0], :: stride[1]]
    c_out, c_in = weight.shape[:2]
    g = grad_out.permute(0, 2, 3, 1).reshape(-1, c_out)
    x = x.permute(0, 2, 3, 1).reshape(-1, c_in)  # a view when x is NHWC and stride is 1
    return (g.t() @ x).view(c_out, c_in, 1, 1).contiguous(memory_format=torch.channels_last)


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` with the faster CPU
    backward where ``use_cpu_conv_gradients`` holds; ``F.conv2d`` itself otherwise. Tuple
    arguments only (string padding such as "same" goes to ``F.conv2d``)."""
    if isinstance(padding, str) or not use_cpu_conv_gradients(x, weight):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    return _Conv2dCPU.apply(x, weight, bias, pair(stride), pair(padding), pair(dilation), groups)
