"""Inference time of a detector's verified ONNX export in onnxruntime (for ``tools/benchmark.py``)."""
import os
import tempfile
import time
from typing import Dict

import torch
from torch import nn

from .exporter import export_detector
from .onnx_export import onnx_session, run_onnx
from .optional import require

__all__ = ["time_onnxruntime"]


def time_onnxruntime(detector: nn.Module, image: torch.Tensor, iters: int = 3, warmup: int = 1) -> Dict[str, float]:
    """Export ``detector`` to ONNX at the size of ``image`` [1, 3, H, W] (verified against PyTorch,
    see :func:`export_detector`), then time ``session.run`` on that image.

    The detector is moved to the CPU for the export. Returns {execution provider: seconds per
    image} for the CPU provider and, where onnxruntime has it, the CUDA provider.
    """
    ort = require("onnxruntime", "timing onnxruntime")
    detector = detector.cpu().eval()
    image = image.detach().cpu().float()
    providers = [p for p in ("CPUExecutionProvider", "CUDAExecutionProvider") if p in ort.get_available_providers()]
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        export_detector(detector, "onnx", path, sample_size=tuple(image.shape[-2:]))
        for provider in providers:
            session = onnx_session(path, providers=[provider, "CPUExecutionProvider"] if provider != "CPUExecutionProvider"
                                   else [provider])
            for _ in range(warmup):
                run_onnx(session, image)
            start = time.perf_counter()
            for _ in range(iters):
                run_onnx(session, image)  # returns numpy arrays: the outputs are on the host
            times[provider] = (time.perf_counter() - start) / iters
    return times
