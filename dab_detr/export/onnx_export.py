"""ONNX files of a :class:`DeploymentModel` (torch's dynamo-based exporter) and running them in onnxruntime."""
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .deployment_model import INPUT_NAMES, OUTPUT_NAMES
from .optional import require

__all__ = ["DEFAULT_OPSET", "onnx_session", "run_onnx", "save_onnx"]

# GridSample (the deformable attention's bilinear sampling) exists from opset 16; opset 20 adds
# its N-D form and more modes. The dynamo exporter targets opset 18 and later.
DEFAULT_OPSET = 20


def save_onnx(exported: torch.export.ExportedProgram, path: str, dim_names: Dict[str, str],
              metadata: Dict[str, str], opset: int = DEFAULT_OPSET) -> None:
    """Translate an exported program to ONNX and write it to ``path``.

    ``dim_names`` renames symbolic sizes (e.g. ``{"s73": "height"}``) everywhere in the graph,
    so that the input reads ``image [1, 3, height, width]``; ``metadata`` goes to the model's
    ``metadata_props``.
    """
    onnx = require("onnx")
    require("onnxscript")
    program = torch.onnx.export(exported, f=None, dynamo=True, opset_version=opset,
                                input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES), verbose=False)
    proto = program.model_proto
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, dim_names)) + r")\b")
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: dim_names[m.group(1)], dim.dim_param)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save(proto, path)


def onnx_session(path: str, providers: Optional[Sequence[str]] = None):
    """An onnxruntime ``InferenceSession`` of ``path``; by default CUDA where onnxruntime has it, else CPU."""
    ort = require("onnxruntime", "running an ONNX file")
    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(path, providers=list(providers))


def run_onnx(session, image) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """image [1, 3, H, W] (tensor or array, 0..255) -> (boxes [K, 4], scores [K], labels [K]) numpy arrays."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    outputs: List[np.ndarray] = session.run(list(OUTPUT_NAMES), {INPUT_NAMES[0]: np.ascontiguousarray(image, dtype=np.float32)})
    return tuple(outputs)
