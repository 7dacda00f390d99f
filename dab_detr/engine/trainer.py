"""Detectron2's ``DefaultTrainer``, driven by a LazyConfig instead of yacs keys.

The LazyConfig has the five standard names: ``model``, ``dataloader`` (``train``, ``test``,
``evaluator``), ``optimizer`` (its ``params.model`` is filled in here), ``lr_multiplier`` and
``train``. ``train`` holds, besides Detectron2's usual keys (``output_dir``, ``init_checkpoint``,
``max_iter``, ``eval_period``, ``log_period``, ``checkpointer``, ``ddp``, ``device``):

- ``precision``: "fp32" (default), "bf16", "fp16" (CUDA only) or "auto" (bf16 where the CPU or
  GPU has it natively, else fp32; ``dab_detr.precision``): the autocast of evaluation and of
  training (bf16 trains without a gradient scaler, fp16 with one; losses and matching stay fp32);
- ``amp.enabled``: the older switch: with ``precision=fp32``, training (not evaluation) runs under
  autocast, fp16 + gradient scaler on CUDA, bf16 on CPU;
- ``clip_grad.max_norm``: L2 gradient clipping of each optimizer step (0 disables);
- ``grad_accumulation_steps``: optimizer steps accumulate this many data-loader batches
  (the effective batch is ``dataloader.train.total_batch_size * grad_accumulation_steps``);
- ``model_ema.enabled`` / ``decay`` / ``warmup``: an EMA of the weights, used for evaluation,
  saved in checkpoints and restored by ``--resume``.

Reliability: the config is checked before anything is built (``dab_detr.config_checks``);
checkpoints are written atomically and ``--resume`` verifies the one it resumes from
(``TrainingCheckpointer``); a non-finite loss or gradient stops the run before its update is
applied (``dab_detr.engine.divergence``), and the checkpoint that step started from (with any later
one) is renamed to ``.suspect``, ``last_checkpoint`` naming the newest one a finite step followed; the data loader's position and the random state are part
of the checkpoint, so a resumed run continues the same run (``dab_detr.data.resumable_loader``).
"""
import contextlib
import logging
import os
import weakref

import torch
from torch.nn.parallel import DistributedDataParallel

from detectron2.config import instantiate
from detectron2.engine import DefaultTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.engine.defaults import default_writers
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from ..checkpoint.training_checkpointer import TrainingCheckpointer
from ..config_checks import check_config
from ..precision import Precision, resolve_precision
from ..data.resumable_loader import resumable_loader_from_config
from .ema import EMAHook, ModelEMA
from .rng_state import RNGState
from .preemption import preemption_hooks
from .divergence import TrainingDivergedError
from .train_loop import DETRTrainLoop

__all__ = ["LazyConfigTrainer", "resolve_device", "training_precision"]

logger = logging.getLogger(__name__)


def resolve_device(requested) -> str:
    """``train.device``: "cuda", "cpu", or None/"auto" (CUDA when available)."""
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(requested).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={requested!r} but no CUDA device is available; "
                           "use train.device=cpu (or auto)")
    return str(requested)


def training_precision(train, device) -> Precision:
    """The autocast of training steps: ``train.precision``, or with fp32 the older
    ``train.amp.enabled`` (fp16 on CUDA, bf16 on CPU)."""
    precision = resolve_precision(train.get("precision", "fp32"), device, "train.precision")
    if not precision.is_reduced and train.get("amp", {}).get("enabled", False):
        legacy = "fp16" if torch.device(device).type == "cuda" else "bf16"
        precision = resolve_precision(legacy, device, "train.amp.enabled")
    return precision


def _unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


class LazyConfigTrainer(DefaultTrainer):
    """``DefaultTrainer`` for LazyConfigs (see the module docstring for the ``train`` keys)."""

    def __init__(self, cfg):
        TrainerBase.__init__(self)  # DefaultTrainer.__init__ reads yacs keys: build our own
        check_config(cfg)
        train = cfg.train
        self.device = resolve_device(train.get("device", None))
        # checked before anything is built: an unusable precision is a one-line error
        self.precision = training_precision(train, self.device)
        logger.info("Training precision: %s", self.precision)
        model = self.build_model(cfg)
        cfg.optimizer.params.model = model
        optimizer = instantiate(cfg.optimizer)
        data_loader = self.build_train_loader(cfg)

        self.ema = ModelEMA(model, **{k: v for k, v in train.model_ema.items() if k != "enabled"}) \
            if train.get("model_ema", {}).get("enabled", False) else None
        ddp_kwargs = dict(train.get("ddp", {}))
        if not self.device.startswith("cuda"):
            # CPU processes (gloo): DDP takes no device ids (create_ddp_model would pass the rank)
            ddp_kwargs.setdefault("device_ids", None)
        ddp_model = create_ddp_model(model, **ddp_kwargs)
        self._trainer = DETRTrainLoop(
            ddp_model, data_loader, optimizer,
            grad_accumulation_steps=train.get("grad_accumulation_steps", 1),
            clip_grad_max_norm=train.get("clip_grad", {}).get("max_norm", 0.0)
            if train.get("clip_grad", {}).get("enabled", True) else 0.0,
            amp=self.precision.is_reduced, amp_dtype=self.precision.dtype,
        )
        self.scheduler = instantiate(cfg.lr_multiplier)
        self.checkpointer = TrainingCheckpointer(
            model, train.output_dir, trainer=weakref.proxy(self),
        )
        if self.ema is not None:
            self.checkpointer.add_checkpointable("model_ema", self.ema)
        # the exact-resume state: where the data stream is, and the random generators
        if hasattr(data_loader, "state_dict"):
            self.checkpointer.add_checkpointable("train_loader", data_loader)
        self.checkpointer.add_checkpointable("rng_state", RNGState())
        self.start_iter = 0
        self.max_iter = train.max_iter
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    # ----------------------------------------------------------------- builders
    def build_model(self, cfg):
        model = instantiate(cfg.model).to(self.device)
        logger.info("Model:\n%s", model)
        return model

    @classmethod
    def build_train_loader(cls, cfg):
        """``dataloader.train``; a ``build_detection_train_loader`` node (no sampler or a
        ``TrainingSampler``) is built as a ``ResumableTrainLoader`` from the same arguments."""
        loader = resumable_loader_from_config(cfg.dataloader.train)
        if loader is None:
            logger.warning("dataloader.train is not a plain build_detection_train_loader: it is built "
                           "as configured, and --resume restarts its data stream (not an exact resume)")
            loader = instantiate(cfg.dataloader.train)
        return loader

    def build_hooks(self):
        train = self.cfg.train
        ret = [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=self.scheduler),
        ]
        if self.ema is not None:
            ret.append(EMAHook(self.ema, _unwrap(self.model)))
        if comm.is_main_process():
            ret.append(hooks.PeriodicCheckpointer(self.checkpointer, **train.checkpointer))
        ret.extend(preemption_hooks(self.checkpointer))  # only in jobs that handle preemption
        if train.get("eval_period", 0) > 0 and "test" in self.cfg.dataloader:
            ret.append(hooks.EvalHook(train.eval_period, self._evaluate))
        if comm.is_main_process():
            ret.append(hooks.PeriodicWriter(default_writers(train.output_dir, self.max_iter),
                                            period=train.get("log_period", 20)))
        return ret

    def train(self):
        """Run training; returns the last evaluation results (``DefaultTrainer.train`` reads yacs keys)."""
        try:
            TrainerBase.train(self, self.start_iter, self.max_iter)
        except TrainingDivergedError as e:
            if e.iteration is None or not comm.is_main_process():
                raise
            raise TrainingDivergedError(f"{e}\n{self._distrust_checkpoints(e.iteration)}", e.iteration) from None
        return getattr(self, "_last_eval_results", {})

    def _distrust_checkpoints(self, diverged_at: int) -> str:
        """Step ``diverged_at`` was not finite: the checkpoint it started from (iteration
        ``diverged_at - 1``) and any later one are not trusted (``TrainingCheckpointer.distrust_from``).
        Returns the line of the message that says so and where ``--resume`` continues."""
        if not self.checkpointer._is_local():
            return "  --resume continues from last_checkpoint (not checked: the output folder is not local)"
        renamed, resume_from = self.checkpointer.distrust_from(diverged_at - 1)
        line = ""
        if renamed:
            line = (f"  checkpoints not followed by a finite step, renamed (not deleted): "
                    f"{', '.join(renamed)}\n")
        if resume_from is None:
            return line + ("  --resume starts the run again from train.init_checkpoint "
                           "(no checkpoint of the run was followed by a finite step)")
        return line + f"  --resume continues from {os.path.join(self.checkpointer.save_dir, resume_from)}"

    def _evaluate(self):
        self._last_eval_results = self.test(self.cfg, _unwrap(self.model), ema=self.ema)
        return self._last_eval_results

    def resume_or_load(self, resume=True):
        """Load ``train.init_checkpoint`` (weights only), or with ``resume`` the last checkpoint
        of ``train.output_dir`` with its optimizer, scheduler, iteration and EMA."""
        self.checkpointer.resume_or_load(self.cfg.train.init_checkpoint, resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = self.iter + 1

    @property
    def model(self):
        return self._trainer.model

    # ----------------------------------------------------------------- evaluation
    @classmethod
    def test(cls, cfg, model, evaluators=None, ema=None):
        """Evaluate ``model`` (with the EMA weights if given) on ``dataloader.test`` with
        ``dataloader.evaluator``, under ``train.precision``. Returns the metrics dict (empty
        without a test set)."""
        if "test" not in cfg.dataloader:
            return {}
        model = _unwrap(model)
        device = next(model.parameters()).device
        precision = resolve_precision(cfg.train.get("precision", "fp32"), device, "train.precision")
        logger.info("Evaluating %s on %s in precision %s", type(model).__name__, device, precision)
        evaluator = evaluators if evaluators is not None else instantiate(cfg.dataloader.evaluator)
        data_loader = instantiate(cfg.dataloader.test)
        weights = ema.apply_to(model) if ema is not None else contextlib.nullcontext()
        with precision.autocast(), weights:  # autocast is thread-local: the model runs in this thread
            results = inference_on_dataset(model, data_loader, evaluator)
        if comm.is_main_process() and results:
            print_csv_format(results)
        return results

