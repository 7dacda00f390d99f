"""Keep freed CPU memory in the process for reuse, instead of handing it back to the OS.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MB) with a new
``mmap`` and unmaps it when it is freed. The next tensor of that size is faulted in again page by
page, and the kernel zeroes every page first. A DAB-DETR-R50 inference forward at 800 x 1216
allocates about 440 MB that way: ~100,000 minor page faults per image, which cost 15% of its
time on a 2-core machine (1.96 s -> 1.67 s per image; a training step 5.35 s -> 4.94 s, both
measured interleaved in one process). PyTorch's CPU performance guide gets the same effect from
jemalloc or tcmalloc through ``LD_PRELOAD``; glibc's own ``mallopt`` gives it with nothing to
install: ``M_MMAP_MAX = 0`` (large blocks come from the heap too) and a very large
``M_TRIM_THRESHOLD`` (freed heap memory is not returned). The cost: the process's resident
memory stays at its peak instead of shrinking between iterations, plus the heap's fragmentation
(R50 training: 2.7 GiB instead of 2.6; the worst pattern tried, one 64 MB tensor allocated and
freed in a loop, settles at 8x the tensor).

The setting is process-wide, so only entry points call it (``tools/lazyconfig_train_net.py``,
``tools/predict.py``, ``tools/benchmark.py``), never an import. The CPU demo's small model
allocates nothing that large (about 50 page faults per training step, no measurable change). A
script of your own calls ``dab_detr.cpu_allocator.configure_cpu_allocator()`` once at its start. The
environment variable ``DAB_DETR_CPU_ALLOCATOR`` chooses: ``keep`` (the default) or ``system``
(glibc's defaults, untouched). Without glibc (macOS, musl) or with another allocator preloaded,
nothing is changed and the function says so in the log.
"""
import ctypes
import ctypes.util
import logging
import os
from typing import Optional

__all__ = ["ENV_VAR", "MODES", "configure_cpu_allocator"]

logger = logging.getLogger(__name__)

ENV_VAR = "DAB_DETR_CPU_ALLOCATOR"
MODES = ("keep", "system")

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# glibc's steady state for a process that frees large blocks: the dynamic mmap threshold rises to
# its maximum (32 MB on 64-bit), the trim threshold to twice that; the default mmap count limit
_SYSTEM = ((_M_MMAP_MAX, 65536), (_M_MMAP_THRESHOLD, 32 * 2**20), (_M_TRIM_THRESHOLD, 64 * 2**20))
_KEEP = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_changed = False  # whether this process's settings were changed to "keep"


def _glibc() -> Optional[ctypes.CDLL]:
    """The C library when it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version
        libc.mallopt
    except (OSError, AttributeError):
        return None
    return libc


def configure_cpu_allocator(mode: Optional[str] = None) -> bool:
    """Set glibc's ``malloc`` for this process: ``"keep"`` freed memory for reuse, or
    ``"system"``: glibc's defaults (untouched; after an earlier ``"keep"``, the settings glibc
    reaches by itself in a process that frees large blocks, and freed memory returned to the OS
    now). ``mode=None`` reads ``DAB_DETR_CPU_ALLOCATOR`` (default ``"keep"``). Returns whether
    glibc's settings were changed."""
    global _changed
    source = "argument"
    if mode is None:
        mode, source = os.environ.get(ENV_VAR, "").strip() or "keep", ENV_VAR
    if mode not in MODES:
        raise ValueError(f"{source}: unknown CPU allocator mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "system" and not _changed:
        return False
    preloaded = [name for name in _OTHER_ALLOCATORS if name in os.environ.get("LD_PRELOAD", "")]
    if preloaded:
        logger.info("CPU allocator: %s is preloaded (LD_PRELOAD); glibc's settings left alone", preloaded[0])
        return False
    libc = _glibc()
    if libc is None:
        logger.info("CPU allocator: not glibc; freed memory is handled by the system's malloc")
        return False
    failed = [param for param, value in (_KEEP if mode == "keep" else _SYSTEM) if libc.mallopt(param, value) != 1]
    if failed:
        logger.warning("CPU allocator: glibc refused mallopt parameters %s for mode %r", failed, mode)
        return False
    _changed = mode == "keep"
    if mode == "system":
        libc.malloc_trim(0)
    logger.info("CPU allocator: %s", f"freed memory kept for reuse ({ENV_VAR}=system turns this off)"
                if mode == "keep" else "glibc's defaults")
    return True
