"""Reading checkpoint files without executing arbitrary code.

A ``.pth`` file is a pickle, and unpickling runs whatever callables the file names. Every file is
therefore read with an allow-list:

- ``.pth`` / ``.pt`` / ``.bin`` / anything else: ``torch.load(weights_only=True)``, which accepts
  tensors and plain containers, plus the few extra types that real checkpoints hold
  (``argparse.Namespace``: the original DAB-DETR stores its command-line arguments).
- ``.safetensors``: ``safetensors.torch.load_file`` (no pickle at all).
- ``.pkl`` (Detectron2 / Caffe2 model zoo): a restricted unpickler that accepts numpy arrays,
  numpy dtypes/scalars and plain containers only.

Anything else raises ``UnsafeCheckpointError`` naming the file and the refused type.
"""
import argparse
import io
import pickle
import re
from collections import OrderedDict
from typing import Any, Dict

import numpy as np
import torch

from ..user_errors import file_problem

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct, scalar as _np_scalar
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct, scalar as _np_scalar

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "ALLOWED_TORCH_GLOBALS",
    "load_checkpoint_file",
    "load_torch_file",
    "load_safetensors_file",
    "load_pickle_file",
]


class CheckpointError(ValueError):
    """A checkpoint cannot be read or converted; the message says which file/key and why."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asks to unpickle a type that is not on the allow-list."""


# Non-tensor types that released checkpoints contain besides tensors and builtin containers.
ALLOWED_TORCH_GLOBALS = [argparse.Namespace]


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Read any supported checkpoint file safely; dispatches on the file extension.

    Returns what the file holds (usually a dict). Raises ``CheckpointError`` if the file does not
    exist or cannot be parsed, ``UnsafeCheckpointError`` if it names a refused type.
    """
    problem = file_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} {problem}")
    if path.endswith(".safetensors"):
        return load_safetensors_file(path)
    if path.endswith(".pkl"):
        return load_pickle_file(path)
    return load_torch_file(path)


def load_torch_file(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` with ``ALLOWED_TORCH_GLOBALS`` allowed."""
    try:
        with torch.serialization.safe_globals(ALLOWED_TORCH_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # a pickled type torch refused, not a damaged file
            raise UnsafeCheckpointError(_refusal_message(path, str(e))) from None
        raise _not_a_checkpoint(path, e) from None
    except Exception as e:  # a file of another kind, or truncated: anything from KeyError to RuntimeError
        raise _not_a_checkpoint(path, e) from None


def _not_a_checkpoint(path: str, error: Exception) -> CheckpointError:
    """The error for a file torch.load cannot read: another kind of file, or a damaged one."""
    if isinstance(error, OSError):  # not the content: the file itself could not be read
        return CheckpointError(f"cannot read checkpoint {path}: {error}")
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip (a pickle before torch 1.6)
        detail = "it is neither a zip archive nor a pickle, as torch.save writes"
    else:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "WeightsUnpickler" not in line and "Weights only" not in line), "")
        reason = reason.split(". ")[0][:160]  # torch's first sentence says what it found
        detail = f"damaged: {type(error).__name__}: {reason}" if reason else f"damaged: {type(error).__name__}"
    return CheckpointError(f"checkpoint {path} is not a readable checkpoint file ({detail})")


def _refusal_message(path: str, torch_message: str) -> str:
    match = re.search(r"GLOBAL ([\w.]+)", torch_message)
    refused = match.group(1) if match else "an object that is not a tensor or a plain container"
    allowed = ", ".join(f"{t.__module__}.{t.__qualname__}" for t in ALLOWED_TORCH_GLOBALS)
    return (
        f"refusing to load {path}: it contains a pickled {refused}, which is not allowed "
        f"(only tensors, plain containers and {allowed} are loaded, with torch.load(weights_only=True)). "
        f"If you trust this file, re-save its weights as a plain state dict or .safetensors."
    )


def load_safetensors_file(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file (flat name -> tensor dict)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:  # SafetensorError, OSError, or a header that is not JSON
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for Detectron2/Caffe2 ``.pkl`` weights: numpy arrays and plain containers only."""

    _ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy.core.multiarray", "scalar"): _np_scalar,
        ("numpy._core.multiarray", "scalar"): _np_scalar,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bytearray,
        ("_codecs", "encode"): __import__("codecs").encode,  # how Python 2 pickles store bytes
    }

    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module, name):
        found = self._ALLOWED.get((module, name))
        if found is None and module in ("numpy", "numpy.dtypes") and name.endswith("DType"):
            found = getattr(np.dtypes, name, None)  # numpy >= 1.25 pickles dtypes as numpy.dtypes.XDType
        if found is None:
            raise UnsafeCheckpointError(
                f"refusing to load {self._path}: it contains a pickled {module}.{name}, which is not "
                f"allowed (a .pkl checkpoint may only hold numpy arrays and plain containers)"
            )
        return found


def load_pickle_file(path: str) -> Any:
    """Read a Detectron2 / Caffe2 ``.pkl`` weight file with ``_NumpyOnlyUnpickler``."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # a corrupt pickle raises anything from EOFError to KeyError
        raise CheckpointError(f"cannot read pickle file {path}: {type(e).__name__}: {e}") from None
