"""Exponential moving average of the model weights, used for evaluation when enabled."""
import contextlib
import math
from typing import Dict

import torch
from torch import nn

from detectron2.engine import HookBase

__all__ = ["ModelEMA", "EMAHook"]


class ModelEMA:
    """EMA of every floating-point tensor of a model's state dict.

    ``decay`` ramps up as ``decay * (1 - exp(-updates / warmup))``, so early (random) weights are
    forgotten quickly. Has ``state_dict``/``load_state_dict``, so a Detectron2 checkpointer can
    save and restore it (``checkpointer.add_checkpointable("model_ema", ema)``).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup: int = 2000):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.model_ema.decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.shadow: Dict[str, torch.Tensor] = {
            k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point
        }

    def current_decay(self) -> float:
        return self.decay * (1 - math.exp(-self.updates / self.warmup)) if self.warmup > 0 else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.updates += 1
        decay = self.current_decay()
        for name, value in model.state_dict().items():
            if name in self.shadow:
                self.shadow[name].mul_(decay).add_(value.detach(), alpha=1 - decay)

    @contextlib.contextmanager
    def apply_to(self, model: nn.Module):
        """Temporarily load the EMA weights into ``model`` (restored on exit)."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(backup, strict=False)

    def state_dict(self):
        return {"shadow": self.shadow, "updates": self.updates, "decay": self.decay, "warmup": self.warmup}

    def load_state_dict(self, state):
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"the EMA state in the checkpoint lacks {sorted(missing)[:5]} ...")
        for k in self.shadow:
            self.shadow[k].copy_(state["shadow"][k])
        self.updates = state["updates"]


class EMAHook(HookBase):
    """Update the EMA after every optimizer step."""

    def __init__(self, ema: ModelEMA, model: nn.Module):
        self.ema = ema
        self.model = model

    def after_step(self):
        self.ema.update(self.model)
