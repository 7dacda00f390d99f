"""Training: a LazyConfig-driven DefaultTrainer with AMP, clipping, accumulation and EMA."""
from .ema import EMAHook, ModelEMA
from .optim import backbone_lr_factor
from .train_loop import DETRTrainLoop, micro_batch_weights
from .trainer import LazyConfigTrainer, resolve_device

__all__ = ["DETRTrainLoop", "EMAHook", "LazyConfigTrainer", "ModelEMA", "backbone_lr_factor",
           "micro_batch_weights", "resolve_device"]
