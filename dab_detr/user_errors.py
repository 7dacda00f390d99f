"""How the tools report a file the user named that cannot be used: one line, exit status 1.

``file_problem`` and ``output_problem`` give the words that finish "checkpoint X ..." ("does not
exist", "is a directory, not a file", ...); the loaders raise their own error types with them
(``CheckpointError``, ``ConfigError``, ``ImageReadError``, ``InputFileError``).
``exit_on_user_errors`` turns those errors into ``error: <message>`` on stderr and exit status 1,
without a traceback, around a tool's ``main``.
"""
import contextlib
import os
from typing import Optional

__all__ = ["InputFileError", "exit_on_user_errors", "file_problem", "output_problem"]


class InputFileError(FileNotFoundError):
    """A file the user named (a config, an image, a metrics file, an output) cannot be read or written."""


def file_problem(path) -> Optional[str]:
    """What keeps ``path`` from being read as a file, or None if it can be opened for reading."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return "does not exist"
    if os.path.isdir(path):
        return "is a directory, not a file"
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied)"
    return None


def output_problem(path) -> Optional[str]:
    """What keeps a file from being written at ``path`` (its folder is created if missing), or None."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        return "is a directory; give a file name"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else "exists and cannot be written (permission denied)"
    parent = os.path.dirname(path)
    while not os.path.exists(parent):  # the nearest existing folder must let us create the rest
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be written: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be written: the folder {parent} is not writable"
    return None


@contextlib.contextmanager
def exit_on_user_errors():
    """Inside: a ``CheckpointError``, ``ConfigError``, ``ImageReadError`` or ``InputFileError``
    ends the program with ``error: <message>`` on stderr and exit status 1 (``SystemExit``)."""
    from .checkpoint import CheckpointError
    from .config_checks import ConfigError
    from .predictor import ImageReadError

    try:
        yield
    except (CheckpointError, ConfigError, ImageReadError, InputFileError) as e:
        raise SystemExit(f"error: {e}") from None
