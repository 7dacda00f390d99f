"""The checkpointer of training runs: atomic writes, and a resume that verifies what it resumes.

- ``save`` and ``tag_last_checkpoint`` write through ``atomic_write``: a kill during a write
  leaves the previous checkpoint and the previous ``last_checkpoint`` intact.
- ``resume_or_load(path, resume=True)`` reads the checkpoint ``last_checkpoint`` names completely
  before using it. If it is missing, truncated or not a training checkpoint, a warning says so and
  the newest other readable training checkpoint of the folder (a ``.pth`` with an
  ``iteration``) is used instead, and ``last_checkpoint`` is pointed at it. With no readable one
  it stops with an error listing each file and why (it does not silently start again).
- A checkpoint is trusted only once a finite step has followed it: the checkpoints of the run
  (those saved, and the one resumed from) are remembered with their iteration, and
  ``distrust_from(k)`` (called by the trainer when step k+1 diverged) renames those of iteration
  >= k to ``<name>.suspect`` and points ``last_checkpoint`` at the newest remaining one (or
  removes ``last_checkpoint`` when none remains, so ``--resume`` starts again).
"""
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from .atomic_write import atomic_write, remove_stale_temporary_files
from .checkpointer import DABDETRCheckpointer
from .safe_load import CheckpointError

__all__ = ["TrainingCheckpointer"]

logger = logging.getLogger(__name__)


class TrainingCheckpointer(DABDETRCheckpointer):
    """``DABDETRCheckpointer`` with atomic saves and a verified resume (see the module docstring)."""

    def _is_local(self) -> bool:
        return bool(self.save_dir) and os.path.isdir(self.save_dir)

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._is_local():  # a path_manager URI: no atomic rename there
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        with atomic_write(save_file, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)
        if "iteration" in kwargs:
            self._remember(int(kwargs["iteration"]), basename)

    # ------------------------------------------------------------------ trust
    def _remember(self, iteration: int, basename: str) -> None:
        runs = [(i, b) for i, b in getattr(self, "_run_checkpoints", []) if b != basename]
        self._run_checkpoints = runs + [(iteration, basename)]

    def distrust_from(self, iteration: int) -> Tuple[List[str], Optional[str]]:
        """The step after ``iteration`` diverged: the checkpoints of this run (saved, or resumed
        from) of iteration >= ``iteration`` were not followed by a finite step. Rename them to
        ``<name>.suspect``, point ``last_checkpoint`` at the newest other one of the run, and
        return (the renamed files, the checkpoint ``--resume`` uses; None: it starts again)."""
        runs = getattr(self, "_run_checkpoints", [])
        suspect = [b for i, b in runs if i >= iteration]
        trusted = [(i, b) for i, b in runs if i < iteration
                   and os.path.isfile(os.path.join(self.save_dir, b))]
        renamed = []
        for basename in suspect:
            path = os.path.join(self.save_dir, basename)
            if os.path.isfile(path):
                os.replace(path, path + ".suspect")
                renamed.append(basename + ".suspect")
        self._run_checkpoints = trusted
        if trusted:
            resume_from = max(trusted)[1]
            self.tag_last_checkpoint(resume_from)
            return renamed, resume_from
        tagged = os.path.join(self.save_dir, "last_checkpoint")
        if self.has_checkpoint():
            name = open(tagged).read().strip()
            if name in suspect or not os.path.isfile(os.path.join(self.save_dir, name)):
                os.remove(tagged)
                return renamed, None
            return renamed, name
        return renamed, None

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._is_local():
            return super().tag_last_checkpoint(last_filename_basename)
        with atomic_write(os.path.join(self.save_dir, "last_checkpoint"), "w") as f:
            f.write(last_filename_basename)

    # ------------------------------------------------------------------ resume
    _verified = None  # (path, checkpoint): the file resume read completely, handed to load() once

    def _torch_load(self, f):
        if self._verified is not None and os.path.abspath(f) == self._verified[0]:
            _, checkpoint = self._verified
            self._verified = None
            return checkpoint
        return super()._torch_load(f)

    def _read_training_checkpoint(self, filename: str) -> Dict[str, Any]:
        """Read ``filename`` completely; raise CheckpointError when it cannot be resumed from."""
        if not os.path.isfile(filename):
            raise CheckpointError(f"{filename} does not exist")
        try:
            checkpoint = self._torch_load(filename)  # the whole file: a truncated one fails here
        except Exception as e:  # truncated zip, bad pickle, refused layout, I/O error
            raise CheckpointError(f"{filename} cannot be read ({type(e).__name__}: {e})") from e
        if not isinstance(checkpoint, dict) or "model" not in checkpoint or "iteration" not in checkpoint:
            raise CheckpointError(f"{filename} is not a training checkpoint (no 'model' and 'iteration')")
        return checkpoint

    def _resume_candidates(self) -> List[str]:
        """The file ``last_checkpoint`` names, then the folder's other .pth files, newest first."""
        tagged = self.get_checkpoint_file() if self.has_checkpoint() else ""
        others = [p for p in self.get_all_checkpoint_files() if os.path.abspath(p) != os.path.abspath(tagged or "")]
        others.sort(key=lambda p: os.path.getmtime(p), reverse=True)
        return ([tagged] if tagged else []) + others

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if not resume or not self._is_local():
            return super().resume_or_load(path, resume=resume)
        remove_stale_temporary_files(self.save_dir)
        if not self.has_checkpoint():
            return super().resume_or_load(path, resume=False)
        problems = []
        for filename in self._resume_candidates():
            try:
                checkpoint = self._read_training_checkpoint(filename)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            if problems:
                logger.warning("cannot resume from the last checkpoint: %s; resuming from %s "
                               "(iteration %s) instead", "; ".join(problems), filename,
                               checkpoint["iteration"])
                self.tag_last_checkpoint(os.path.basename(filename))
            # verified: load() takes the checkpoint already read through the usual path (no second read)
            self._verified = (os.path.abspath(filename), checkpoint)
            try:
                loaded = self.load(filename)
            finally:
                self._verified = None
            self._remember(int(checkpoint["iteration"]), os.path.basename(filename))
            return loaded
        raise CheckpointError(
            f"--resume: no readable training checkpoint in {self.save_dir}:\n  " + "\n  ".join(problems)
            + "\nMove the folder away (or run without --resume) to start the run again.")
