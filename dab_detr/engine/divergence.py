"""Stopping a diverged run before its bad update is applied.

``check_step_is_finite`` runs after the backward pass and before the optimizer step: when the loss
or the gradient norm is not finite, it raises ``TrainingDivergedError`` naming the iteration, every
loss term and the parameters whose gradients are not finite. No optimizer step is applied, and since
the exception leaves the iteration before its ``after_step`` hooks run, no checkpoint of that
iteration is written. The checkpoint of the iteration before holds the weights this step started
from: it is not trusted either. ``LazyConfigTrainer.train`` then renames it (and any later one of the
run) to ``<name>.suspect`` and points ``last_checkpoint`` at the newest checkpoint that was followed by
a finite step (``TrainingCheckpointer.distrust_from``); the message says where ``--resume`` continues.

One host-device synchronization per step (a single boolean).
"""
from typing import Dict, Iterable, Optional, Tuple

import torch

__all__ = ["TrainingDivergedError", "check_step_is_finite"]

_MAX_LISTED = 8


class TrainingDivergedError(FloatingPointError):
    """The loss or the gradient of a training step is NaN or infinite (``iteration``: the step)."""

    def __init__(self, message: str, iteration: Optional[int] = None):
        super().__init__(message)
        self.iteration = iteration


def _format_losses(losses: Dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{name}={float(value):.6g}" for name, value in sorted(losses.items()))


def check_step_is_finite(iteration: int, losses: Dict[str, torch.Tensor],
                         named_parameters: Iterable[Tuple[str, torch.nn.Parameter]],
                         grad_norm: Optional[torch.Tensor] = None, check_gradients: bool = True) -> None:
    """Raise TrainingDivergedError when the step's loss or gradients are not finite.

    losses: the step's loss terms (scalar tensors). grad_norm: the L2 norm of all gradients when
    already computed (by clipping), else it is computed here. check_gradients: False with an fp16
    gradient scaler, which skips steps with overflowing gradients itself.
    """
    named_parameters = [(n, p) for n, p in named_parameters if p.grad is not None]
    total = torch.stack([v.detach().float().reshape(()) for v in losses.values()]).sum()
    checks = [total]
    if check_gradients and named_parameters:
        if grad_norm is None:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for _, p in named_parameters])
        checks.append(grad_norm.detach().float().reshape(()).to(total.device))
    if bool(torch.isfinite(torch.stack(checks)).all()):
        return
    what = "the loss" if not torch.isfinite(total) else "the gradient"
    lines = [f"training diverged at iteration {iteration}: {what} is not finite. The optimizer step "
             f"was not applied and no checkpoint of this iteration is written (consider a lower lr or "
             f"gradient clipping).",
             f"  loss terms: {_format_losses(losses)} (total {float(total):.6g})"]
    if check_gradients and len(checks) > 1:
        bad = [n for n, p in named_parameters if not bool(torch.isfinite(p.grad).all())]
        lines.append(f"  gradient norm: {float(checks[1]):.6g}")
        if bad:
            more = f" ... and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
            lines.append(f"  non-finite gradients in {len(bad)} parameters: "
                         f"{', '.join(bad[:_MAX_LISTED])}{more}")
    raise TrainingDivergedError("\n".join(lines), iteration)
