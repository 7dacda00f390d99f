"""torch.export of a :class:`DeploymentModel` with symbolic H and W, and errors that name the module."""
import sys
import traceback
from typing import Dict

import torch
from torch import nn

from .deployment_model import INPUT_NAMES, DeploymentModel, NotExportableError

__all__ = ["export_program", "minimum_input_size", "symbolic_input_sizes"]


def export_program(program: DeploymentModel, sample: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` the program at ``sample`` [1, 3, H, W] with H and W dynamic.

    Raises :class:`NotExportableError` naming the innermost module of the detector that was
    running when tracing failed (a data-dependent branch, a ``.item()``, a size fixed to a
    Python int, an unsupported operation).
    """
    dynamic = {INPUT_NAMES[0]: {2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}}
    try:
        with torch.no_grad():
            return torch.export.export(program, (sample,), dynamic_shapes=dynamic, strict=False)
    except Exception as e:  # torch raises many types here; all mean "this model does not trace"
        where = _failing_module(e, program.detector)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NotExportableError(
            f"cannot export {type(program.detector).__name__}: tracing failed in {where} with "
            f"{type(e).__name__}: {first_line}"
        ) from e


def symbolic_input_sizes(exported: torch.export.ExportedProgram) -> Dict[str, str]:
    """{symbol name: "height" | "width"} of the image input of an exported program."""
    node = next(n for n in exported.graph.nodes if n.op == "placeholder" and n.name == INPUT_NAMES[0])
    shape = node.meta["val"].shape
    return {str(shape[2]): "height", str(shape[3]): "width"}


def minimum_input_size(exported: torch.export.ExportedProgram) -> Dict[str, int]:
    """{"height": h, "width": w}: the smallest sizes the program accepts (torch.export derives
    them from the model, e.g. a feature map of at least 2 x 2 pixels)."""
    node = next(n for n in exported.graph.nodes if n.op == "placeholder" and n.name == INPUT_NAMES[0])
    shape = node.meta["val"].shape
    sizes = {}
    for axis, name in ((2, "height"), (3, "width")):
        symbol = shape[axis].node.expr
        sizes[name] = int(exported.range_constraints[symbol].lower)
    return sizes


def _failing_module(error: BaseException, detector: nn.Module) -> str:
    """'module <name> (<class>)' of the innermost detector module in the error's traceback."""
    names = {id(m): name for name, m in detector.named_modules()}
    found = None
    seen = set()
    while error is not None and id(error) not in seen:  # the error and what caused it
        seen.add(id(error))
        for frame, _ in traceback.walk_tb(error.__traceback__):
            module = frame.f_locals.get("self")
            if isinstance(module, nn.Module) and id(module) in names:
                found = (names[id(module)], module, frame)
        error = error.__cause__ or error.__context__
    if found is None:
        return "an unknown place (no detector module in the traceback)"
    name, module, frame = found
    return (f"module {name or '<detector>'!r} ({type(module).__name__}, "
            f"{frame.f_code.co_filename}:{frame.f_lineno})")
