"""Hungarian matching between predictions and ground-truth boxes."""
from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimizing a focal + L1 + GIoU cost.

    Cost of pairing query i with target j (SPEC section 6):
    ``cost_class * focal(p_i at class_j) + cost_bbox * |b_i - b_j|_1 - cost_giou * GIoU(b_i, b_j)``
    with the focal cost ``alpha (1-p)^gamma (-log(p + 1e-8)) - (1-alpha) p^gamma (-log(1-p + 1e-8))``.

    Guarantee: image k gets ``min(num_queries, num_targets_k)`` pairs; every query and every
    target is used at most once. Images are matched independently, so a batch gives the same
    pairs as each image alone.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0, matching would be arbitrary")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.alpha = alpha
        self.gamma = gamma

    @torch.no_grad()
    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, target: Dict) -> torch.Tensor:
        """Cost of one image.

        Args:
            logits: [Q, C] class logits; boxes: [Q, 4] normalized (cx, cy, w, h).
            target: dict with ``labels`` [N] (0..C-1) and ``boxes`` [N, 4] normalized (cx, cy, w, h).

        Returns:
            [Q, N] cost (float32).
        """
        prob = logits.float().sigmoid()[:, target["labels"]]
        neg = (1 - self.alpha) * prob**self.gamma * -(1 - prob + 1e-8).log()
        pos = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        boxes = boxes.float()
        tgt_boxes = target["boxes"].float()
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(
            box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
        )
        return self.cost_class * (pos - neg) + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(
        self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, targets: List[Dict]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Match every image of the batch.

        Args:
            pred_logits: [B, Q, C]; pred_boxes: [B, Q, 4] normalized (cx, cy, w, h).
            targets: B dicts with ``labels`` [N_k] and ``boxes`` [N_k, 4] (normalized cx, cy, w, h).

        Returns:
            B pairs ``(query_index, target_index)``, int64 tensors of length min(Q, N_k) on CPU,
            sorted by query index.
        """
        indices = []
        for logits, boxes, target in zip(pred_logits, pred_boxes, targets):
            if len(target["labels"]) == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            cost = self.cost_matrix(logits, boxes, target).cpu()
            if not torch.isfinite(cost).all():
                raise FloatingPointError(
                    "HungarianMatcher: the matching cost has NaN/inf entries; predictions or target "
                    "boxes are not finite (check the input data and the learning rate)"
                )
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
