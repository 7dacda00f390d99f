"""Atomic file writes: a kill at any moment leaves either the old file or the complete new one.

The data goes to a temporary file in the same folder (``.<name>.tmp-<random>``), is flushed and
fsync'ed, then ``os.replace`` puts it in place (atomic on POSIX and Windows within one file
system) and the folder entry is fsync'ed. A leftover temporary file means a writer was killed;
``remove_stale_temporary_files`` cleans them up.

Test hook: when the environment variable ``DAB_DETR_TEST_ATOMIC_WRITE_PAUSE`` is set to
``SECONDS`` or ``FILENAME:SECONDS``, every write (of that file name only, with the second form)
pauses that long after the data is written and before the rename, so that a test can kill the
process inside a write. It is read at each write and unset in normal use.
"""
import contextlib
import glob
import logging
import os
import tempfile
import time
from typing import IO, Iterator, List

__all__ = ["atomic_write", "remove_stale_temporary_files", "TEST_PAUSE_ENV"]

logger = logging.getLogger(__name__)
TEST_PAUSE_ENV = "DAB_DETR_TEST_ATOMIC_WRITE_PAUSE"
_TMP_MARK = ".tmp-"


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _test_pause(path: str) -> None:
    setting = os.environ.get(TEST_PAUSE_ENV)
    if not setting:
        return
    name, _, seconds = setting.rpartition(":")
    if not name or name == os.path.basename(path):
        time.sleep(float(seconds))


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_write(path) as f: f.write(...)``: ``path`` is replaced only when the block
    finishes without an exception (then the new content is on disk); otherwise it is untouched
    and the temporary file is removed. mode: "wb" or "w"."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}{_TMP_MARK}", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _test_pause(path)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def remove_stale_temporary_files(folder: str) -> List[str]:
    """Remove the temporary files that killed ``atomic_write`` calls left in ``folder``.
    Returns their paths (a warning names them)."""
    stale = sorted(p for p in glob.glob(os.path.join(folder, f".*{_TMP_MARK}*")) if os.path.isfile(p))
    for p in stale:
        with contextlib.suppress(OSError):
            os.remove(p)
    if stale:
        logger.warning("removed %d incomplete checkpoint writes left by a killed run: %s",
                       len(stale), ", ".join(os.path.basename(p) for p in stale))
    return stale
