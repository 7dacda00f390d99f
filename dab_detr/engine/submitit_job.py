"""A training (or evaluation) job for submitit that checkpoints and requeues itself when preempted.

Every task of the job (one per GPU) runs ``tools/lazyconfig_train_net.py`` unchanged, in-process,
with the environment of ``submitit.helpers.TorchDistributedEnvironment`` (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT from SLURM's variables, or from submitit's local executor),
which ``dab_detr.engine.launch_env`` joins. Preemption follows submitit's ``checkpoint()`` protocol:

- training installs a ``PreemptionHandler`` for SIGTERM (SLURM's preemption), SIGUSR1 and
  submitit's own signal (``submitit.JobEnvironment.USR_SIG``, USR2 unless
  ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise; the one submitit's sbatch ``--signal`` asks for
  before the time limit). The trainer stops after the current step, the main process saves a
  checkpoint (``dab_detr.engine.preemption``);
- then the main task hands the signal to the handler submitit had installed: submitit calls
  ``TrainingJob.checkpoint()``, which returns the same job with ``--resume``, writes it as the
  job's new submission and requeues the job (``scontrol requeue`` on SLURM, a restart with the
  local executor). The requeued job resumes from the checkpoint. Time-outs count against
  submitit's ``max_num_timeout``; preemptions do not.

``--eval-only`` jobs keep submitit's own handlers: on the signal they are requeued and evaluate
again from the start.
"""
import os
import runpy
import signal
import sys
from typing import List, Optional, Sequence

try:
    import submitit
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("dab_detr.engine.submitit_job needs submitit: pip install -e '.[cluster]'") from e

from .preemption import PreemptionHandler, TrainingPreempted

__all__ = ["TrainingJob", "preemption_signals"]


def preemption_signals() -> List[int]:
    """SIGTERM, SIGUSR1 and submitit's preemption/time-out signal (SIGUSR2 by default)."""
    return list(dict.fromkeys([signal.SIGTERM, signal.SIGUSR1,
                               signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]]))


class TrainingJob(submitit.helpers.Checkpointable):
    """``python <script> <argv>`` in every task of a submitit job (see the module docstring).

    Args:
        script: absolute path of ``tools/lazyconfig_train_net.py``.
        argv: its arguments (``--config-file ...``, ``--eval-only``, ``--resume``, overrides).
    """

    def __init__(self, script: str, argv: Sequence[str]):
        self.script = os.path.abspath(script)
        self.argv = list(argv)

    @property
    def eval_only(self) -> bool:
        return "--eval-only" in self.argv

    def __call__(self) -> Optional[dict]:
        dist_env = submitit.helpers.TorchDistributedEnvironment()
        # every task sees all GPUs of its node: Detectron2 uses GPU <local rank>
        dist_env.export(set_cuda_visible_devices=False, overwrite=True)
        if self.eval_only:
            self._run()
            return None
        handler = PreemptionHandler(preemption_signals())
        with handler:
            try:
                self._run()
            except TrainingPreempted as stopped:
                if dist_env.rank == 0:
                    self._requeue(handler, stopped)  # exits this process
                return {"preempted_after_iteration": stopped.iteration, "checkpoint": stopped.checkpoint}
        return None

    def _run(self) -> None:
        saved_argv = sys.argv
        sys.argv = [self.script] + self.argv
        try:
            runpy.run_path(self.script, run_name="__main__")
        finally:
            sys.argv = saved_argv

    @staticmethod
    def _requeue(handler: PreemptionHandler, stopped: TrainingPreempted) -> None:
        usr_sig = signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]
        submitit_handler = handler.previous_handlers.get(usr_sig)
        if not callable(submitit_handler):
            raise RuntimeError(f"{stopped}: no submitit handler for {usr_sig.name} to requeue the job "
                               "(is this running inside a submitit job?)")
        # submitit: calls self.checkpoint(), saves the new submission, requeues, exits
        submitit_handler(stopped.signum, None)

    def checkpoint(self, *args, **kwargs) -> "submitit.helpers.DelayedSubmission":
        """The job to requeue: the same one, resuming from the last checkpoint of its output dir."""
        argv = self.argv if self.eval_only or "--resume" in self.argv else ["--resume"] + self.argv
        return submitit.helpers.DelayedSubmission(TrainingJob(self.script, argv))
