"""Box helpers that torchvision.ops does not provide.

Conversions and IoUs come from ``torchvision.ops`` (``box_convert``, ``generalized_box_iou``);
only the logit-space helper of DAB-DETR and the GIoU of matched pairs live here.
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


def paired_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """GIoU of row i of ``boxes1`` with row i of ``boxes2`` (both [N, 4] xyxy) -> [N].

    The diagonal of ``torchvision.ops.generalized_box_iou(boxes1, boxes2)``, which the original
    loss computes, without the other N^2 - N pairs: the same operations in the same order, so
    the same numbers. (``torchvision.ops.generalized_box_iou_loss`` is element-wise too, but adds
    an eps of 1e-7 to both divisions, which the original's loss does not.)
    """
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area1 + area2 - inter
    iou = inter / union
    wh_hull = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    hull = wh_hull[:, 0] * wh_hull[:, 1]
    return iou - (hull - union) / hull
