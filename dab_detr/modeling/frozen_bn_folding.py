"""Frozen batch norm folded into the preceding convolution, and the backbone's memory layout.

A ``FrozenBatchNorm2d`` after a convolution is an affine map with constant per-channel scale
``s = weight / sqrt(running_var + eps)`` and shift ``t = bias - running_mean * s``, so
``bn(conv(x, W, b)) == conv(x, W * s, b * s + t)``. Computing it as one convolution removes an
element-wise pass over every activation of the backbone (12% of DAB-DETR-R50's inference time on
CPU, and a pass in the backward too). The fold is a reparametrization, not a rewrite of the
weights: ``FrozenBNConv2d`` keeps the convolution's ``weight`` and the norm's buffers exactly as
they are (the checkpoint layout, the parameters the optimizer trains and ``state_dict`` are
unchanged) and folds them on the fly; gradients reach ``weight`` through ``W * s``. In
inference (no autograd) the folded tensors are cached until a weight or buffer changes.

``channels_last``: oneDNN (CPU) and cuDNN run convolutions faster in NHWC. Convolution weights
in ``torch.channels_last`` make PyTorch choose that layout for the input too, and the layout then
propagates through ReLU, additions and pooling, so the whole trunk runs NHWC with no explicit
conversion of the input.
"""
from typing import Tuple

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn

from .cpu_conv_gradients import conv2d

__all__ = ["FrozenBNConv2d", "fold_frozen_batchnorm", "optimize_backbone"]


class FrozenBNConv2d(Conv2d):
    """Detectron2's ``Conv2d`` whose ``norm`` is a ``FrozenBatchNorm2d``, run as one convolution.

    Same parameters, buffers and names as the ``Conv2d`` it replaces (``weight``, optional
    ``bias``, ``norm.weight``, ``norm.bias``, ``norm.running_mean``, ``norm.running_var``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.norm, FrozenBatchNorm2d):
            raise TypeError(f"FrozenBNConv2d needs norm=FrozenBatchNorm2d, got {type(self.norm).__name__}")
        self._cache_key = None
        self._cache = None

    def folded_weight_and_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(W * s [out, in/groups, kh, kw] in W's memory layout, b * s + t [out])."""
        norm = self.norm
        tensors = (self.weight, norm.weight, norm.bias, norm.running_mean, norm.running_var)
        if self.bias is not None:
            tensors = tensors + (self.bias,)
        # the cache is only used without autograd (with it, W * s must be part of the graph), and
        # not under torch.compile, which folds the constants itself
        use_cache = not (torch.is_grad_enabled() and self.weight.requires_grad) and not torch.compiler.is_compiling()
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors) if use_cache else None
        if use_cache and key == self._cache_key:
            return self._cache
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        shift = norm.bias - norm.running_mean * scale
        weight = self.weight * scale.to(self.weight.dtype).view(-1, 1, 1, 1)
        bias = shift if self.bias is None else self.bias * scale + shift
        bias = bias.to(self.weight.dtype)
        if use_cache:
            self._cache_key, self._cache = key, (weight, bias)
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, H, W] -> activation(bn(conv(x))) [B, C_out, H', W'], in one convolution."""
        if torch.jit.is_tracing():
            # jit tracing (fvcore's FLOP count, TorchScript / ONNX export by tracing) records the
            # unfolded conv + batch norm: FLOP counts keep their convention (batch norm counted)
            # and exporters see the standard graph, which they fold themselves
            return super().forward(x)
        weight, bias = self.folded_weight_and_bias()
        # under autocast F.conv2d casts weight and bias itself, as for the unfolded Conv2d; in CPU
        # training the backward takes the faster kernel per gradient (cpu_conv_gradients)
        x = conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if self.activation is not None:
            x = self.activation(x)
        return x

    @classmethod
    def from_conv(cls, conv: Conv2d) -> "FrozenBNConv2d":
        """A ``FrozenBNConv2d`` sharing ``conv``'s parameter and norm objects (no copy)."""
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
            padding_mode=conv.padding_mode, norm=conv.norm, activation=conv.activation,
            device="meta",  # the parameters are replaced by conv's own right below
        )
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new


def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Replace, in place, every Detectron2 ``Conv2d`` with a ``FrozenBatchNorm2d`` norm under
    ``module`` by a ``FrozenBNConv2d`` sharing its parameters. Returns how many were replaced.

    ``state_dict`` keys and values are unchanged, so checkpoints load before or after. Call it
    before building an optimizer (the parameter objects are kept, so one built before also works).
    """
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is Conv2d and isinstance(child.norm, FrozenBatchNorm2d):
                setattr(parent, name, FrozenBNConv2d.from_conv(child))
                count += 1
    return count


def optimize_backbone(backbone: nn.Module, channels_last: bool = True) -> nn.Module:
    """Fold frozen batch norms into their convolutions and, with ``channels_last``, put the
    convolution weights in NHWC layout. Same function up to floating-point rounding (the outputs
    agree to ~1e-6 relative); returns ``backbone`` (changed in place)."""
    fold_frozen_batchnorm(backbone)
    if channels_last:
        for m in backbone.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return backbone
