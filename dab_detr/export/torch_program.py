"""``torch.export`` program files (``.pt2``) of a :class:`DeploymentModel`: saving, loading, running."""
from typing import Callable, Tuple

import torch

__all__ = ["load_torch_program", "save_torch_program"]


def save_torch_program(exported: torch.export.ExportedProgram, path: str) -> None:
    """Write an exported program with ``torch.export.save`` (a zip archive, conventionally ``.pt2``)."""
    torch.export.save(exported, path)


def load_torch_program(path: str) -> Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Load a ``.pt2`` file; returns ``image [1, 3, H, W] -> (boxes, scores, labels)``.

    Runs without Detectron2 or this package (the program holds only torch operations).
    """
    module = torch.export.load(path).module()

    def run(image: torch.Tensor):
        with torch.no_grad():
            return tuple(module(image))

    return run
