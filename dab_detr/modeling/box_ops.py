"""Box helpers that torchvision.ops does not provide.

Conversions and IoUs come from ``torchvision.ops`` (``box_convert``, ``generalized_box_iou``);
only the logit-space helper of DAB-DETR lives here.
"""
import torch


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Inverse of ``sigmoid`` with the original's clamping.

    Args:
        x: any shape, values in [0, 1].
        eps: clamp margin. The original code uses 1e-3 (the transformers port uses 1e-5); with
            1e-3 a box coordinate whose logit exceeds about 6.9 is clipped when it goes through
            ``sigmoid`` and back. We follow the original, because the released weights were
            trained with it.

    Returns:
        Tensor of the same shape: ``log(x / (1 - x))`` with both terms clamped to at least ``eps``.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
