"""Export a detector to a verified ONNX or torch.export file.

The file is written to a temporary path beside ``output``, run on the sample input and on a
second input of another size, compared with the detector's own PyTorch inference, and moved to
``output`` only if every detection agrees.
"""
import os
import tempfile
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .comparison import DetectionDifference, compare_detections
from .deployment_model import INPUT_NAMES, OUTPUT_NAMES, DeploymentModel
from .onnx_export import DEFAULT_OPSET, onnx_session, run_onnx, save_onnx
from .optional import require
from .torch_program import load_torch_program, save_torch_program
from .tracing import export_program, minimum_input_size, symbolic_input_sizes

__all__ = ["FORMATS", "ExportMismatchError", "ExportReport", "OutputPathError", "export_detector",
           "pytorch_detections", "synthetic_image"]

FORMATS = ("onnx", "torch_export")


class OutputPathError(ValueError):
    """The output file cannot be written."""


class ExportMismatchError(RuntimeError):
    """The exported file computes other detections than PyTorch; nothing was written."""


@dataclass
class ExportReport:
    path: str
    format: str
    num_detections: int
    min_size: Tuple[int, int] = (0, 0)
    checks: List[Tuple[Tuple[int, int], DetectionDifference]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"wrote {self.path} ({self.format}): image [1, 3, H, W] -> boxes [{self.num_detections}, 4], "
                 f"scores [{self.num_detections}], labels [{self.num_detections}]; H >= {self.min_size[0]}, "
                 f"W >= {self.min_size[1]}"]
        lines += [f"  checked at {h}x{w} against PyTorch: {diff}" for (h, w), diff in self.checks]
        return "\n".join(lines)


def synthetic_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """[1, 3, H, W] float in 0..255: smooth random colour blobs plus noise (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, height // 24), max(2, width // 24), generator=g)
    image = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    image = image * 0.8 + 0.2 * torch.rand(1, 3, height, width, generator=g)
    return (image * 255).round()


@torch.no_grad()
def pytorch_detections(detector: nn.Module, image: torch.Tensor):
    """The detector's own Detectron2 inference on image [1, 3, H, W] -> (boxes, scores, labels) on CPU."""
    detector.eval()
    instances = detector([{"image": image[0].to(detector.device)}])[0]["instances"]
    return (instances.pred_boxes.tensor.cpu(), instances.scores.cpu(), instances.pred_classes.cpu())


def check_output_path(output: str) -> str:
    """The absolute output path; raises :class:`OutputPathError` if it cannot be written."""
    path = os.path.abspath(output)
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise OutputPathError(f"output {output!r} is a directory; give a file name")
    if not os.path.isdir(parent):
        raise OutputPathError(f"output {output!r}: the directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"output {output!r}: the directory {parent!r} is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise OutputPathError(f"output {output!r} exists and is not writable")
    return path


def export_detector(
    detector: nn.Module,
    format: str,
    output: str,
    sample_size: Tuple[int, int] = (480, 640),
    check_size: Optional[Tuple[int, int]] = None,
    opset: int = DEFAULT_OPSET,
    score_tol: float = 1e-4,
    box_tol: float = 1e-2,
) -> ExportReport:
    """Export ``detector`` (DAB-DETR or DAB-Deformable-DETR, on CPU) to ``output``, verified.

    Args:
        format: ``"onnx"`` (run by onnxruntime for the check) or ``"torch_export"`` (a ``.pt2``
            program of ``torch.export.save``).
        sample_size: (H, W) of the image the program is traced with; H and W stay dynamic.
        check_size: (H, W) of the second check image; default: the sample size transposed
            (another size and orientation), or +32 where H == W.
        opset: ONNX opset (>= 16 for GridSample; 18+ for the exporter).
        score_tol, box_tol: the largest score and box-coordinate (pixel) differences accepted.

    Raises:
        ValueError for an unknown format, OutputPathError, NotExportableError (naming the
        module), MissingExportDependencyError, ExportMismatchError (with the differences; no
        file is written).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; expected one of {FORMATS}")
    path = check_output_path(output)
    if format == "torch_export" and not path.endswith(".pt2"):
        raise OutputPathError(f"output {output!r}: a torch.export program must be saved with the suffix .pt2 "
                              f"(torch.export.load accepts no other)")
    if format == "onnx":
        for package in ("onnx", "onnxscript", "onnxruntime"):
            require(package)
    program = DeploymentModel(detector)
    sample = synthetic_image(*sample_size, seed=0)
    if check_size is None:
        check_size = (sample_size[1], sample_size[0]) if sample_size[0] != sample_size[1] else \
            (sample_size[0] + 32, sample_size[1])
    if tuple(check_size) == tuple(sample_size):
        raise ValueError(f"check_size {check_size} must differ from sample_size {sample_size}")
    exported = export_program(program, sample)
    min_size = minimum_input_size(exported)

    fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".onnx" if format == "onnx" else ".pt2", dir=os.path.dirname(path))
    os.close(fd)
    try:
        if format == "onnx":
            metadata = {"input_format": detector.input_format, "size_divisibility": program.size_divisibility,
                        "inputs": "image [1, 3, height, width] float32 0..255",
                        "min_height": min_size["height"], "min_width": min_size["width"],
                        "outputs": "boxes [K, 4] xyxy pixels, scores [K], labels [K] int64"}
            save_onnx(exported, tmp, symbolic_input_sizes(exported), metadata, opset=opset)
            session = onnx_session(tmp, providers=["CPUExecutionProvider"])
            _check_onnx_signature(session)
            run = lambda image: run_onnx(session, image)  # noqa: E731
        else:
            save_torch_program(exported, tmp)
            run = load_torch_program(tmp)

        report = ExportReport(path=path, format=format, num_detections=0,
                              min_size=(min_size["height"], min_size["width"]))
        for size, seed in ((tuple(sample_size), 0), (tuple(check_size), 1)):
            image = synthetic_image(*size, seed=seed)
            reference = pytorch_detections(detector, image)
            outputs = run(image)
            _check_output_shapes(outputs, len(reference[1]))
            diff = compare_detections(reference, outputs, score_tol, box_tol)
            report.checks.append((size, diff))
            if not diff.ok:
                raise ExportMismatchError(
                    f"the exported {format} program disagrees with PyTorch at input {size[0]}x{size[1]}: {diff}; "
                    f"nothing was written to {path}"
                )
        report.num_detections = len(reference[1])
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the permissions of a normally created file, not mkstemp's 0600
        os.replace(tmp, path)
        return report
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_onnx_signature(session) -> None:
    inputs = [(i.name, list(i.shape)) for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [(INPUT_NAMES[0], [1, 3, "height", "width"])] or outputs != list(OUTPUT_NAMES):
        raise RuntimeError(f"unexpected ONNX signature: inputs {inputs}, outputs {outputs}; expected "
                           f"image [1, 3, height, width] -> {list(OUTPUT_NAMES)}")


def _check_output_shapes(outputs, k: int) -> None:
    boxes, scores, labels = outputs
    shapes = [tuple(boxes.shape), tuple(scores.shape), tuple(labels.shape)]
    if shapes != [(k, 4), (k,), (k,)]:
        raise RuntimeError(f"exported program returned shapes {shapes}; expected boxes ({k}, 4), scores ({k},), labels ({k},)")
    if str(labels.dtype) not in ("int64", "torch.int64"):
        raise RuntimeError(f"exported program returned labels of dtype {labels.dtype}; expected int64")
