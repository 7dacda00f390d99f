"""The optional packages of ONNX export, imported with an error that says what to install."""
import importlib
from types import ModuleType

__all__ = ["MissingExportDependencyError", "require"]

INSTALL_HINT = "pip install -e .[export]"


class MissingExportDependencyError(ImportError):
    """An optional package needed for ONNX export or onnxruntime is not installed."""


def require(package: str, purpose: str = "ONNX export") -> ModuleType:
    """Import ``package`` (``onnx``, ``onnxruntime``, ``onnxscript``) or raise
    :class:`MissingExportDependencyError` naming it and the install command."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise MissingExportDependencyError(
            f"{purpose} needs the package {package!r}, which is not installed ({e}); install the "
            f"export extra (onnx, onnxruntime, onnxscript) with `{INSTALL_HINT}`"
        ) from e
