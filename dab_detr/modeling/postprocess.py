"""Top-k post-processing over all (query, class) pairs."""
from typing import Tuple

import torch
from torchvision.ops import box_convert


def select_top_k(
    pred_logits: torch.Tensor, pred_boxes: torch.Tensor, k: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the k highest (query, class) scores of each image, as the original PostProcess.

    A query can appear several times with different classes.

    Args:
        pred_logits: [B, Q, C] class logits (sigmoid scores, no background class).
        pred_boxes: [B, Q, 4] normalized (cx, cy, w, h).
        k: number of detections per image; clipped to Q * C.

    Returns:
        scores [B, k], labels [B, k] (0..C-1), boxes [B, k, 4] normalized (x0, y0, x1, y1).
    """
    batch, num_queries, num_classes = pred_logits.shape
    k = min(k, num_queries * num_classes)
    prob = pred_logits.sigmoid().flatten(1)
    scores, index = prob.topk(k, dim=1)
    query_index = torch.div(index, num_classes, rounding_mode="floor")
    labels = index % num_classes
    boxes = torch.gather(pred_boxes, 1, query_index.unsqueeze(-1).expand(-1, -1, 4))
    return scores, labels, box_convert(boxes, "cxcywh", "xyxy")
