"""One optimizer step of DETR-style training: mixed precision, gradient clipping, accumulation."""
import contextlib
import time
from typing import Dict, List

import torch
from torch.nn.parallel import DistributedDataParallel

from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from .divergence import check_step_is_finite

__all__ = ["DETRTrainLoop", "micro_batch_weights"]


def micro_batch_weights(micro_batches: List[List[Dict]]) -> List[float]:
    """Loss weights that make k accumulated micro-batches equal one batch of all their images.

    The DETR losses are sums divided by the number of target boxes of the batch (averaged over
    processes, at least 1). Micro-batch i alone is normalized by ``max(N_i, 1)``; one big batch
    would be normalized by ``max(N, 1)`` with ``N = sum N_i``. Scaling micro-batch i's loss by
    ``max(N_i, 1) / max(N, 1)`` therefore gives exactly the gradient of the big batch (the
    matching is per image, so it does not depend on the batching). Box counts are averaged over
    processes exactly as the criterion does.

    Args:
        micro_batches: k lists of Detectron2 input dicts with ``instances``.

    Returns:
        k weights (they sum to 1 when every micro-batch has boxes).
    """
    counts = torch.tensor([[float(sum(len(x["instances"]) for x in batch)) for batch in micro_batches]])
    if comm.get_world_size() > 1:
        counts = torch.cat(comm.all_gather(counts)).mean(0, keepdim=True)
    counts = counts[0]
    total = counts.sum().clamp(min=1)
    return (counts.clamp(min=1) / total).tolist()


class DETRTrainLoop(SimpleTrainer):
    """``SimpleTrainer`` with what DETR training needs, in one place.

    One iteration = one optimizer step, made of ``grad_accumulation_steps`` micro-batches from
    the data loader (weighted by ``micro_batch_weights``, so accumulating k batches of b images
    gives the update of one batch of k*b images). Gradients of the accumulated step are clipped
    once, to ``clip_grad_max_norm`` (L2 over all parameters; 0 disables). With ``amp``, the
    forward pass runs under autocast (fp16 with a gradient scaler on CUDA, bf16 elsewhere).

    Logged losses are those of the whole step (the weighted sum over micro-batches), and so are
    the detector's diagnostics (``training_metrics``, logged by the main process). A step whose
    loss or gradient is not finite raises ``TrainingDivergedError`` before the optimizer step
    (``dab_detr.engine.divergence``).
    """

    def __init__(self, model, data_loader, optimizer, *, grad_accumulation_steps: int = 1,
                 clip_grad_max_norm: float = 0.0, amp: bool = False, amp_dtype: torch.dtype = None):
        super().__init__(model, data_loader, optimizer)
        if grad_accumulation_steps < 1:
            raise ValueError(f"train.grad_accumulation_steps must be >= 1, got {grad_accumulation_steps}")
        self.grad_accumulation_steps = grad_accumulation_steps
        self.clip_grad_max_norm = clip_grad_max_norm
        self.amp = amp
        device_type = next(model.parameters()).device.type
        self.device_type = device_type
        self.amp_dtype = amp_dtype or (torch.float16 if device_type == "cuda" else torch.bfloat16)
        self.grad_scaler = torch.amp.GradScaler(
            device_type, enabled=amp and device_type == "cuda" and self.amp_dtype == torch.float16
        )

    def run_step(self):
        assert self.model.training, "[DETRTrainLoop] model was changed to eval mode!"
        start = time.perf_counter()
        micro_batches = [next(self._data_loader_iter) for _ in range(self.grad_accumulation_steps)]
        data_time = time.perf_counter() - start
        weights = micro_batch_weights(micro_batches) if self.grad_accumulation_steps > 1 else [1.0]

        self.optimizer.zero_grad()
        step_losses: Dict[str, torch.Tensor] = {}
        step_metrics: Dict[str, torch.Tensor] = {}
        for i, (batch, weight) in enumerate(zip(micro_batches, weights)):
            last = i == len(micro_batches) - 1
            # DDP: all-reduce the gradients only once, after the last micro-batch
            sync = (self.model.no_sync() if isinstance(self.model, DistributedDataParallel) and not last
                    else contextlib.nullcontext())
            with sync:
                with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp):
                    loss_dict = self.model(batch)
                losses = sum(loss_dict.values())
                self.grad_scaler.scale(losses * weight).backward()
            for name, value in loss_dict.items():
                step_losses[name] = step_losses.get(name, 0.0) + value.detach() * weight
            for name, value in self._model_metrics().items():
                step_metrics[name] = step_metrics.get(name, 0.0) + value * weight

        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        # with an fp16 gradient scaler, overflowing gradients are the scaler's to skip
        check_gradients = not self.grad_scaler.is_enabled()
        if self.clip_grad_max_norm > 0:
            self.grad_scaler.unscale_(self.optimizer)
        grad_norm = None
        if params and (self.clip_grad_max_norm > 0 or check_gradients):
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        # before clipping and the optimizer step: a non-finite loss or gradient stops the run
        # with no update applied (and names the parameters whose gradients are not finite)
        check_step_is_finite(self.iter, step_losses, self.model.named_parameters(), grad_norm,
                             check_gradients=check_gradients)
        if self.clip_grad_max_norm > 0 and grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.clip_grad_max_norm, grad_norm)
        self.after_backward()
        self._write_metrics(step_losses, data_time)
        if step_metrics and comm.is_main_process():
            get_event_storage().put_scalars(**{name: float(value) for name, value in step_metrics.items()})
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def _model_metrics(self) -> Dict[str, torch.Tensor]:
        """The detector's diagnostics of its last training forward (``training_metrics``, e.g.
        ``class_error``), read here, after the backward, rather than inside the forward."""
        model = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        return getattr(model, "training_metrics", {})

    def state_dict(self):
        ret = super().state_dict()
        ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
