"""The numeric precision of inference (and training): one setting, its checks and its autocast.

Names (``train.precision`` in a LazyConfig, ``--precision`` on the tools):

- ``fp32``: float32 everywhere, the default and the reference;
- ``bf16``: the network under ``torch.autocast`` with bfloat16 (CPU or CUDA);
- ``fp16``: autocast with float16, CUDA only (CPU float16 autocast is slow and unsupported here:
  asking for it on a CPU is an error);
- ``auto``: bf16 where the hardware computes it natively (a CPU with AVX512-BF16 or AMX, a CUDA
  device of compute capability 8.0 or newer), else fp32.

Autocast runs the matrix products (convolutions, linear layers, attention) in the low precision
and leaves the rest to the model: the heads, anchors, position encodings, box arithmetic, the
deformable sampling (``grid_sample`` is float32 under CPU autocast) and the losses stay float32
(the measured reasons are in ``tests/test_precision.py``).

    precision = resolve_precision("auto", "cpu")      # Precision(name='bf16', ..., reason=...)
    with precision.autocast():
        outputs = model(inputs)
"""
import contextlib
from dataclasses import dataclass

import torch

__all__ = ["PRECISIONS", "Precision", "PrecisionError", "cpu_has_native_bf16", "cuda_has_native_bf16",
           "parse_precision", "resolve_precision", "run_in_fp32"]

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
# /proc/cpuinfo flags of CPUs with bf16 arithmetic (x86: AVX512-BF16, AMX; Arm: the BF16 extension)
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


class PrecisionError(ValueError):
    """A precision name that does not exist, or one the device cannot run (the message says which)."""


def parse_precision(name, where: str = "precision") -> str:
    """A precision name ('fp32', 'bf16', 'fp16', 'auto'; 'float32', 'bfloat16', 'float16' accepted)
    -> its short name. ``where`` names the setting in the error (e.g. 'train.precision')."""
    text = "fp32" if name is None else str(name).strip().lower()
    text = _ALIASES.get(text, text)
    if text not in PRECISIONS:
        raise PrecisionError(f"{where}={name!r} is not a precision; use one of {', '.join(PRECISIONS)}")
    return text


def _cpuinfo_flags() -> set:
    """The CPU feature flags of /proc/cpuinfo (Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("flags", "Features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic instructions (AVX512-BF16, AMX-BF16 or Arm BF16).

    Without them bf16 still runs (oneDNN converts through AVX-512), but is slower than fp32.
    Asks torch's CPU capability checks first, then /proc/cpuinfo.
    """
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, check, None)
        if fn is not None and fn():
            return True
    return any(flag in _cpuinfo_flags() for flag in _CPU_BF16_FLAGS)


def cuda_has_native_bf16(device=None) -> bool:
    """Whether the CUDA device computes in bf16 natively (compute capability >= 8.0)."""
    if not torch.cuda.is_available():
        return False
    with torch.cuda.device(device if device is not None else torch.cuda.current_device()):
        return torch.cuda.is_bf16_supported(including_emulation=False)


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` ('fp32', 'bf16' or 'fp16') on ``device_type``; ``requested``
    is what was asked for (e.g. 'auto') and ``reason`` says why ``auto`` chose ``name``."""

    name: str
    device_type: str
    requested: str
    reason: str = ""

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    @property
    def is_reduced(self) -> bool:
        return self.name != "fp32"

    def autocast(self):
        """The autocast context of this precision (a no-op for fp32)."""
        if not self.is_reduced:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def describe(self) -> str:
        """'bf16 (auto: ...)' or 'fp32', for the log line that says what ran."""
        if self.requested == "auto":
            return f"{self.name} (auto: {self.reason})"
        return self.name

    def __str__(self):
        return self.describe()


def resolve_precision(name, device, where: str = "precision") -> Precision:
    """The precision ``name`` for ``device`` ('cpu', 'cuda', 'cuda:1' or a torch.device).

    Raises PrecisionError for an unknown name and for fp16 on a CPU.
    """
    requested = parse_precision(name, where)
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        if requested in ("fp32", "auto"):
            return Precision("fp32", device.type, requested, f"no reduced precision on {device.type}")
        raise PrecisionError(f"{where}={requested}: reduced precision runs on CPU or CUDA, not {device.type}")
    if requested == "fp16" and device.type == "cpu":
        raise PrecisionError(f"{where}=fp16 needs a CUDA device (float16 autocast is not supported "
                             "on CPU here); use bf16 or auto on a CPU")
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError(f"{where}=bf16: the CUDA device {torch.cuda.get_device_name(device)} has no "
                             "bfloat16 support; use fp16 or fp32")
    if requested != "auto":
        return Precision(requested, device.type, requested)
    if device.type == "cpu":
        native = cpu_has_native_bf16()
        reason = "this CPU has native bf16" if native else "this CPU has no native bf16 (avx512_bf16/amx_bf16)"
    else:
        native = cuda_has_native_bf16(device)
        reason = ("the CUDA device supports bf16" if native
                  else "the CUDA device has no native bf16 (compute capability < 8.0)")
    return Precision("bf16" if native else "fp32", device.type, requested, reason)


def run_in_fp32(fn, *args):
    """``fn(*args)`` in float32 inside an autocast region: autocast off and the floating-point
    tensors of ``args`` cast with ``.float()`` (other arguments, e.g. bool masks or None, as given).

    Outside autocast (fp32 inference, export) it is exactly ``fn(*args)``: no cast, no context.
    The model marks with it the parts whose bf16 rounding moved boxes and scores
    (``tests/test_precision.py`` has the measurements).
    """
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    device_type = tensors[0].device.type if tensors else "cpu"
    if not torch.is_autocast_enabled(device_type):
        return fn(*args)
    with torch.autocast(device_type, enabled=False):
        return fn(*[a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
