"""Parameter count and FLOPs of a Detectron2 detector (DAB-DETR or any other), counted with fvcore.

The FLOPs follow the convention of the DETR papers, whose numbers DAB-DETR's Table 2 extends:
Detectron2's ``FlopCountAnalysis`` (fvcore, jit tracing) over the model's Detectron2 forward in
evaluation mode, where one fused multiply-add counts as one FLOP. fvcore has no handle for
``aten::scaled_dot_product_attention``, which both ``nn.MultiheadAttention`` (encoder) and the
decoder's attention call; without one, every attention product would silently count as zero.
``attention_flop_jit`` adds it: the two matrix products the operator computes, ``q @ k^T`` and
``softmax(.) @ v``. Batch norm (frozen, under 0.5% of a ResNet's count) is counted by fvcore's
default handle: Detectron2 asks fvcore to ignore it, but fvcore keeps an existing handle over
an ignore request. Element-wise operators (softmax, activations, sine embeddings, additions) are
not counted, as fvcore and Detectron2 do by default; the operators left without a count are
reported in ``ModelStats.uncounted_ops`` so that nothing is dropped silently.
"""
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import torch
from detectron2.utils.analysis import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

__all__ = ["ModelStats", "analyze_model", "attention_flop_jit", "count_parameters", "format_stats"]


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(all parameters, trainable parameters) of ``model``; frozen ones (e.g. FrozenBN, frozen stages) count in the first."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def attention_flop_jit(inputs: List[Any], outputs: List[Any]) -> Counter:
    """fvcore handle for ``aten::scaled_dot_product_attention(q, k, v, ...)``.

    q: [..., Lq, E], k: [..., Lk, E], v: [..., Lk, Ev] (leading dims: batch, heads). Counts
    ``q @ k^T`` (prod(...) * Lq * Lk * E) plus ``attn @ v`` (prod(...) * Lq * Lk * Ev)
    multiply-adds; the scaling, mask and softmax are element-wise and not counted.
    """
    q, k, v = (get_shape(x) for x in inputs[:3])
    if q is None or k is None or v is None:
        raise ValueError("attention_flop_jit: the traced attention inputs have no complete shapes")
    batch = 1
    for size in q[:-2]:
        batch *= size
    length_q, dim_qk = q[-2], q[-1]
    length_k, dim_v = k[-2], v[-1]
    return Counter({"attention": batch * length_q * length_k * (dim_qk + dim_v)})


@dataclass
class ModelStats:
    """What ``analyze_model`` measured.

    ``flops`` are fused multiply-adds (fvcore's "flop"), for one image of ``height`` x ``width``
    (before the model pads it to its backbone's size divisibility).
    """

    height: int
    width: int
    params: int
    trainable_params: int
    flops: int
    flops_by_operator: Dict[str, int] = field(default_factory=dict)
    flops_by_module: Dict[str, int] = field(default_factory=dict)
    uncounted_ops: Dict[str, int] = field(default_factory=dict)

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def analyze_model(model: nn.Module, height: int, width: int, seed: int = 0) -> ModelStats:
    """Count the parameters of ``model`` and its FLOPs on one random image.

    Args:
        model: a Detectron2 meta-architecture (forward takes ``[{"image": [3, H, W]}]``). It is
            put in evaluation mode; the FLOPs are those of inference (no loss, no matching).
        height, width: input image size in pixels (e.g. 800 x 1333, the longest test size).
        seed: seed of the random 0-255 image (the count does not depend on the pixel values
            for DAB-DETR, whose compute is fixed for a given image size).

    Returns:
        ``ModelStats``; ``flops_by_module`` is broken down over the model's direct children.
    """
    if height < 1 or width < 1:
        raise ValueError(f"analyze_model: height and width must be positive, got {height} x {width}")
    params, trainable = count_parameters(model)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    image = (torch.rand(3, height, width, generator=generator) * 255).to(device)
    model.eval()
    with torch.no_grad():
        analysis = FlopCountAnalysis(model, [{"image": image}])
        analysis.set_op_handle("aten::scaled_dot_product_attention", attention_flop_jit)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = analysis.total()
        by_module = analysis.by_module()
        # TracingAdapter wraps the model as ``model``: its children are ``model.<name>``
        children = {
            name[len("model."):]: count for name, count in by_module.items()
            if name.startswith("model.") and name.count(".") == 1 and count > 0
        }
        return ModelStats(
            height=height, width=width, params=params, trainable_params=trainable, flops=int(total),
            flops_by_operator=dict(analysis.by_operator()), flops_by_module=children,
            uncounted_ops=dict(analysis.unsupported_ops()),
        )


def format_stats(stats: ModelStats) -> str:
    """A short human-readable report of ``stats``."""
    lines = [
        f"parameters: {stats.params:,} ({stats.params / 1e6:.2f} M); "
        f"trainable: {stats.trainable_params:,} ({stats.trainable_params / 1e6:.2f} M)",
        f"GFLOPs at {stats.height} x {stats.width}: {stats.gflops:.1f} "
        "(fvcore: 1 fused multiply-add = 1 FLOP, inference forward, one image)",
        "  by operator: " + ", ".join(
            f"{name} {count / 1e9:.2f}" for name, count in sorted(stats.flops_by_operator.items(), key=lambda x: -x[1])
        ),
        "  by module:   " + ", ".join(
            f"{name} {count / 1e9:.2f}" for name, count in sorted(stats.flops_by_module.items(), key=lambda x: -x[1])
        ),
    ]
    if stats.uncounted_ops:
        lines.append("  not counted (no fvcore handle; element-wise or negligible): " + ", ".join(
            f"{name} x{count}" for name, count in sorted(stats.uncounted_ops.items())
        ))
    return "\n".join(lines)
