"""Training: a LazyConfig-driven DefaultTrainer with AMP, clipping, accumulation and EMA."""
from .divergence import TrainingDivergedError
from .ema import EMAHook, ModelEMA
from .optim import backbone_lr_factor
from .rng_state import RNGState
from .train_loop import DETRTrainLoop, micro_batch_weights
from .trainer import LazyConfigTrainer, resolve_device

__all__ = ["DETRTrainLoop", "EMAHook", "LazyConfigTrainer", "ModelEMA", "RNGState", "TrainingDivergedError",
           "backbone_lr_factor", "micro_batch_weights", "resolve_device"]
