"""Random-weight models that are well-conditioned by construction, and finiteness checks that name
the first bad tensor.

A randomly initialized ResNet with ``FrozenBatchNorm2d`` does not normalize at all (its statistics
are mean 0, variance 1): through the 33 blocks of R101-DC5 the C5 features reach ~1e5, the encoder's
attention logits overflow float32 in the backward and the gradients turn NaN, on some CPUs and not
on others (different rounding). Pretrained backbones (every config starts from ImageNet weights)
carry statistics that keep activations of order 1. ``calibrate_frozen_batchnorm`` stands in for
them: one calibration pass over the test input sets each frozen norm's mean and variance from the
activations it actually receives, layer after layer in execution order, so each normalized output
has zero mean and unit variance per channel on that input.

Detectron2's ``Conv2d`` + ``FrozenBatchNorm2d`` is folded into one convolution by the model
(``dab_detr.modeling.frozen_bn_folding``), so the norm's own forward never runs: the calibration
computes the convolution's raw output itself for those, and hooks the norm where it does run.

``FinitenessProbe`` records, in execution order, the first module whose output is non-finite and,
in the backward, the first module output whose gradient is non-finite; ``assert_finite_gradients``
names the parameters whose gradients are not finite. Their messages give module name, shape, the
largest finite magnitude and the count of non-finite entries, so a failure says where it started.
"""
import math
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn
from torch.nn import functional as F

__all__ = [
    "EncoderConditioning",
    "FinitenessProbe",
    "assert_finite_gradients",
    "calibrate_frozen_batchnorm",
    "describe_tensor",
]


def _set_statistics(norm: FrozenBatchNorm2d, x: torch.Tensor) -> None:
    """Mean and variance of ``x`` [B, C, H, W] per channel, unit weight, zero bias."""
    x = x.detach().float()
    norm.running_mean.copy_(x.mean((0, 2, 3)))
    var = x.var((0, 2, 3))
    # a channel that is (nearly) constant on the test input (a dead ReLU, a tiny map) would
    # otherwise be amplified by up to 1 / sqrt(eps) ~ 300: at most 10x the typical channel's gain
    var = var.clamp(min=max(1e-2 * var.mean().item(), 1e-6))
    norm.running_var.copy_(var - norm.eps)
    norm.weight.fill_(1.0)
    norm.bias.zero_()


def _conv_pre_hook(conv: Conv2d, args) -> None:
    # the folded conv computes bn(conv(x)) in one step: compute conv(x) here to calibrate bn
    x = args[0]
    raw = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    _set_statistics(conv.norm, raw)


def _norm_pre_hook(norm: FrozenBatchNorm2d, args) -> None:
    _set_statistics(norm, args[0])


@torch.no_grad()
def calibrate_frozen_batchnorm(model: nn.Module, batched_inputs: List[Dict]) -> int:
    """Set every ``FrozenBatchNorm2d`` of ``model`` from its activations on ``batched_inputs``.

    One eval-mode forward (of the backbone alone for a detector with ``preprocess_image``); each
    norm is set before it is applied, so every later layer sees already-calibrated inputs.
    Returns the number of norms set (0 for a model without frozen BN, e.g. Swin or ViT, whose
    LayerNorms normalize by themselves). The model is left in eval mode.
    """
    hooks, seen = [], set()
    for module in model.modules():
        if isinstance(module, Conv2d) and isinstance(module.norm, FrozenBatchNorm2d):
            hooks.append(module.register_forward_pre_hook(_conv_pre_hook))
            seen.add(id(module.norm))
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            # also set by its conv when that runs unfolded: the same values again
            hooks.append(module.register_forward_pre_hook(_norm_pre_hook))
            seen.add(id(module))
    model.eval()
    try:
        if hasattr(model, "preprocess_image") and hasattr(model, "backbone"):
            model.backbone(model.preprocess_image(batched_inputs).tensor)
        else:
            model(batched_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return len(seen)


class EncoderConditioning:
    """Context manager measuring, during the forwards run inside it, how large the encoder's input
    and its attention logits are.

    ``result`` holds ``max_abs_encoder_input`` (max |x| of the transformer's ``src``, the projected
    backbone features), ``max_abs_attention_logit`` (max |q . k| / sqrt(head_dim) over the encoder's
    ``nn.MultiheadAttention`` layers, padded keys included; 0 when it has none) and
    ``backbone_stage_rms``: the root mean square of each backbone output, by name.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.result = {"max_abs_encoder_input": 0.0, "max_abs_attention_logit": 0.0, "backbone_stage_rms": {}}
        self._hooks = []

    def _record_input(self, module, args):
        value = args[0].detach().abs().max().item()
        self.result["max_abs_encoder_input"] = max(self.result["max_abs_encoder_input"], value)

    @torch.no_grad()
    def _record_logits(self, attn: nn.MultiheadAttention, args):
        query, key = args[0], args[1]  # the encoder layer passes them positionally
        d, heads = attn.embed_dim, attn.num_heads
        w_q, w_k = attn.in_proj_weight[:d], attn.in_proj_weight[d:2 * d]
        b_q, b_k = attn.in_proj_bias[:d], attn.in_proj_bias[d:2 * d]
        q = F.linear(query, w_q, b_q).unflatten(-1, (heads, -1)).transpose(-2, -3)
        k = F.linear(key, w_k, b_k).unflatten(-1, (heads, -1)).transpose(-2, -3)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(d // heads)
        self.result["max_abs_attention_logit"] = max(self.result["max_abs_attention_logit"], logits.abs().max().item())

    def _record_stages(self, module, args, output):
        if isinstance(output, dict):
            for name, value in output.items():
                self.result["backbone_stage_rms"][name] = value.detach().float().pow(2).mean().sqrt().item()

    def __enter__(self) -> "EncoderConditioning":
        transformer = self.model.transformer
        self._hooks = [transformer.register_forward_pre_hook(self._record_input),
                       self.model.backbone.register_forward_hook(self._record_stages)]
        self._hooks += [m.register_forward_pre_hook(self._record_logits)
                        for m in transformer.encoder.modules() if isinstance(m, nn.MultiheadAttention)]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


# ---------------------------------------------------------------------------------- finiteness
def _tensors(value, prefix: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    """(path, tensor) for every floating-point tensor in a module output (tensors, tuples, lists, dicts)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield prefix, value
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{prefix}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{prefix}[{key!r}]")


def describe_tensor(t: torch.Tensor) -> str:
    """'shape [..], N non-finite of M (nan a, inf b), max |finite| x' for a message."""
    t = t.detach()
    finite = torch.isfinite(t)
    bad = int((~finite).sum())
    nan = int(torch.isnan(t).sum())
    largest = t[finite].abs().max().item() if bool(finite.any()) else float("nan")
    return (f"shape {list(t.shape)}, {bad} non-finite of {t.numel()} (nan {nan}, inf {bad - nan}), "
            f"max |finite value| {largest:.4g}")


class FinitenessProbe:
    """Context manager recording where a forward (and its backward) first went non-finite.

    Inside ``with FinitenessProbe(model) as probe:``, forward hooks on every submodule check
    each output as it is produced (execution order, innermost module first, since a module's
    hook runs when it returns) and attach a gradient hook to each output that needs a gradient,
    so that the backward's first non-finite gradient (backward order) is recorded as well.
    ``assert_finite_forward()`` and ``assert_finite_backward()`` raise ``AssertionError`` naming the
    module, output, shape, largest finite magnitude and count of non-finite entries.
    """

    def __init__(self, model: nn.Module, model_name: str = "model"):
        self.model = model
        self.model_name = model_name
        self.first_forward: Optional[str] = None
        self.first_backward: Optional[str] = None
        self._hooks = []

    def _forward_hook(self, name: str):
        def hook(module, args, output):
            for path, t in _tensors(output):
                if self.first_forward is None and not bool(torch.isfinite(t.detach()).all()):
                    self.first_forward = f"output{path} of {name} ({type(module).__name__}): {describe_tensor(t)}"
                if t.requires_grad:
                    t.register_hook(self._gradient_hook(f"output{path} of {name} ({type(module).__name__})"))
        return hook

    def _gradient_hook(self, where: str):
        def hook(grad):
            if self.first_backward is None and not bool(torch.isfinite(grad).all()):
                self.first_backward = f"gradient of {where}: {describe_tensor(grad)}"
        return hook

    def __enter__(self) -> "FinitenessProbe":
        for name, module in self.model.named_modules():
            self._hooks.append(module.register_forward_hook(self._forward_hook(name or self.model_name)))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def assert_finite_forward(self) -> None:
        assert self.first_forward is None, f"first non-finite activation: {self.first_forward}"

    def assert_finite_backward(self) -> None:
        assert self.first_backward is None, f"first non-finite gradient (backward order): {self.first_backward}"


def assert_finite_gradients(model: nn.Module, probe: Optional[FinitenessProbe] = None) -> None:
    """Every parameter's ``.grad`` that exists is finite; else an ``AssertionError`` naming the first
    parameter (registration order) with its shape, counts and largest finite magnitude, how many
    parameters are affected, and, given the ``probe`` of the forward, where the backward first
    went non-finite."""
    bad = [(name, p.grad) for name, p in model.named_parameters()
           if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    if not bad:
        return
    name, grad = bad[0]
    others = ", ".join(n for n, _ in bad[1:6]) + (", ..." if len(bad) > 6 else "")
    message = (f"{len(bad)} parameter(s) have non-finite gradients; first: {name}: {describe_tensor(grad)}"
               + (f"; also {others}" if others else ""))
    if probe is not None and probe.first_backward is not None:
        message += f"; first non-finite gradient in backward order: {probe.first_backward}"
    raise AssertionError(message)
