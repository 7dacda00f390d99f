"""Stop training at a step boundary when the job is preempted or about to time out, with a checkpoint.

SLURM announces the end of a job with a signal: SIGTERM to every task on preemption, and the
``--signal`` of the job (submitit sets ``USR2@90`` by default, many sbatch scripts use ``USR1``)
some seconds before the time limit. A checkpoint cannot be written inside the signal handler:
the handler may run in the middle of an optimizer step or of a collective. So:

1. ``PreemptionHandler.install()`` replaces the handlers of those signals by one that only
   records the signal (the previous handlers are kept and restored by ``uninstall``);
2. ``PreemptionCheckpointHook`` (added by ``LazyConfigTrainer`` while a handler is installed)
   asks after every step whether any process got a signal (one small all-gather over
   Detectron2's gloo group), so that all processes stop after the same iteration;
3. the main process then saves ``model_{iter:07d}.pth`` with ``trainer.checkpointer`` (model,
   optimizer, scheduler, iteration, EMA: what ``--resume`` restores) and every process raises
   ``TrainingPreempted``, which ends ``trainer.train()`` (its ``after_train`` hooks still run).

Requeueing is the caller's business (``dab_detr.engine.submitit_job`` hands over to submitit).
The last iteration is never interrupted: the run then ends normally with ``model_final.pth``.
"""
import logging
import os
import signal
import time
from typing import Callable, Dict, Iterable, Optional

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["PreemptionCheckpointHook", "PreemptionHandler", "TrainingPreempted",
           "active_preemption_handler", "preemption_hooks"]

logger = logging.getLogger(__name__)

_ACTIVE: Optional["PreemptionHandler"] = None


class TrainingPreempted(BaseException):
    """Training stopped after ``iteration`` because of ``signum``; its checkpoint is ``checkpoint``.

    A ``BaseException`` (like ``KeyboardInterrupt``): Detectron2's training loop logs every
    ``Exception`` as a crash, and code that catches ``Exception`` must not swallow a preemption."""

    def __init__(self, iteration: int, signum: int, checkpoint: str):
        super().__init__(f"preempted by {signal.Signals(signum).name} after iteration {iteration}; "
                         f"checkpoint {checkpoint}")
        self.iteration, self.signum, self.checkpoint = iteration, signum, checkpoint


class PreemptionHandler:
    """Records the first of ``signals`` this process receives (nothing else happens in the handler).

    Use as a context manager, or ``install()`` / ``uninstall()``; while installed it is what
    ``active_preemption_handler()`` returns. ``previous_handlers`` maps each signal to the handler
    it replaced (e.g. submitit's), for the caller to hand over to once the checkpoint is written."""

    def __init__(self, signals: Iterable[int] = (signal.SIGUSR1, signal.SIGTERM)):
        self.signals = tuple(dict.fromkeys(signal.Signals(s) for s in signals))
        self.received: Optional[int] = None
        self.received_at: Optional[float] = None
        self.previous_handlers: Dict[int, Callable] = {}

    def _record(self, signum, frame):  # pylint: disable=unused-argument
        if self.received is None:
            self.received, self.received_at = signum, time.time()

    def install(self) -> "PreemptionHandler":
        global _ACTIVE
        if _ACTIVE is not None:
            raise RuntimeError("a PreemptionHandler is already installed in this process")
        for signum in self.signals:
            self.previous_handlers[signum] = signal.signal(signum, self._record)
        _ACTIVE = self
        return self

    def uninstall(self) -> None:
        global _ACTIVE
        for signum, previous in self.previous_handlers.items():
            signal.signal(signum, previous)
        self.previous_handlers = {}
        if _ACTIVE is self:
            _ACTIVE = None

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()


def active_preemption_handler() -> Optional[PreemptionHandler]:
    """The installed ``PreemptionHandler`` of this process, or None."""
    return _ACTIVE


class PreemptionCheckpointHook(HookBase):
    """After each step: if any process received a preemption signal, checkpoint and stop.

    Every process must run this hook (it all-gathers a flag when there are several)."""

    def __init__(self, checkpointer, handler: PreemptionHandler):
        self.checkpointer = checkpointer
        self.handler = handler

    def _signal_anywhere(self) -> Optional[int]:
        received = self.handler.received
        if comm.get_world_size() > 1:
            gathered = [s for s in comm.all_gather(received) if s is not None]
            received = gathered[0] if gathered else None
        return received

    def after_step(self):
        signum = self._signal_anywhere()
        iteration = self.trainer.iter
        if signum is None or iteration + 1 >= self.trainer.max_iter:
            return  # nothing received, or the last iteration: let the run finish normally
        name = f"model_{iteration:07d}"
        if comm.is_main_process():
            logger.warning("Received %s: saving a checkpoint after iteration %d and stopping",
                           signal.Signals(signum).name, iteration)
            self.checkpointer.save(name, iteration=iteration)
        comm.synchronize()  # the checkpoint exists before any process leaves
        raise TrainingPreempted(iteration, signum, os.path.join(self.checkpointer.save_dir, f"{name}.pth"))


def preemption_hooks(checkpointer) -> list:
    """``[PreemptionCheckpointHook]`` while a ``PreemptionHandler`` is installed, else ``[]``."""
    handler = active_preemption_handler()
    return [] if handler is None else [PreemptionCheckpointHook(checkpointer, handler)]
