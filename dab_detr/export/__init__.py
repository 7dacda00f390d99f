"""Deployment: DAB-DETR and DAB-Deformable-DETR as verified ONNX or torch.export programs.

The program takes ``image`` [1, 3, H, W] (float, 0..255, the config's ``input_format``; H and W
dynamic) and returns ``boxes`` [K, 4] (x0, y0, x1, y1 in input pixels), ``scores`` [K] and
``labels`` [K] (contiguous class ids). See :class:`DeploymentModel` and :func:`export_detector`.
"""
from .comparison import DetectionDifference, compare_detections
from .deployment_model import INPUT_NAMES, OUTPUT_NAMES, DeploymentModel, NotExportableError
from .exporter import (FORMATS, ExportMismatchError, ExportReport, OutputPathError, export_detector,
                       pytorch_detections, synthetic_image)
from .onnx_export import DEFAULT_OPSET, onnx_session, run_onnx
from .optional import MissingExportDependencyError
from .torch_program import load_torch_program

__all__ = [
    "DEFAULT_OPSET", "FORMATS", "INPUT_NAMES", "OUTPUT_NAMES", "DeploymentModel", "DetectionDifference",
    "ExportMismatchError", "ExportReport", "MissingExportDependencyError", "NotExportableError",
    "OutputPathError", "compare_detections", "export_detector", "load_torch_program", "onnx_session",
    "pytorch_detections", "run_onnx", "synthetic_image",
]
