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
    def pairwise_cost(self, logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                      tgt_boxes: torch.Tensor) -> torch.Tensor:
        """Cost of every (prediction, target) pair.

        Args:
            logits: [P, C] class logits; boxes: [P, 4] normalized (cx, cy, w, h).
            labels: [N] (0..C-1); tgt_boxes: [N, 4] normalized (cx, cy, w, h).

        Returns:
            [P, N] cost (float32). Each entry depends only on its own pair, so computing many
            images (or layers) in one call gives the same numbers as one image at a time.
        """
        prob = logits.float().sigmoid()[:, labels]
        neg = (1 - self.alpha) * prob**self.gamma * -(1 - prob + 1e-8).log()
        pos = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        boxes = boxes.float()
        tgt_boxes = tgt_boxes.float()
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(
            box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
        )
        return self.cost_class * (pos - neg) + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou

    @torch.no_grad()
    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, target: Dict) -> torch.Tensor:
        """Cost of one image: logits [Q, C], boxes [Q, 4], target ``labels`` [N] and ``boxes``
        [N, 4] -> [Q, N] (float32)."""
        return self.pairwise_cost(logits, boxes, target["labels"], target["boxes"])

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
        return self.match_layers(pred_logits[None], pred_boxes[None], targets)[0]

    @torch.no_grad()
    def match_layers(
        self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, targets: List[Dict]
    ) -> List[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """Match the outputs of several decoder layers against the same targets, each layer and
        each image independently (the same pairs as ``forward`` on each layer alone).

        The costs of all layers and images are computed in one batched call and copied to the
        host once (one synchronization on a GPU instead of one per layer and image); only the
        Hungarian assignment (scipy) runs per layer and image.

        Args:
            pred_logits: [L, B, Q, C]; pred_boxes: [L, B, Q, 4] normalized (cx, cy, w, h).
            targets: B dicts with ``labels`` [N_k] and ``boxes`` [N_k, 4].

        Returns:
            L lists of B pairs ``(query_index, target_index)`` as ``forward`` returns them.
        """
        num_layers, batch, num_queries = pred_logits.shape[:3]
        sizes = [len(t["labels"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [[(empty, empty)] * batch for _ in range(num_layers)]
        cost = self.pairwise_cost(
            pred_logits.flatten(0, 2), pred_boxes.flatten(0, 2),
            torch.cat([t["labels"] for t in targets]), torch.cat([t["boxes"] for t in targets]),
        ).view(num_layers, batch, num_queries, -1).cpu()
        if not torch.isfinite(cost).all():
            raise FloatingPointError(
                "HungarianMatcher: the matching cost has NaN/inf entries; predictions or target "
                "boxes are not finite (check the input data and the learning rate)"
            )
        cost = cost.numpy()
        starts = [sum(sizes[:k]) for k in range(batch)]
        indices = []
        for layer_cost in cost:
            layer_indices = []
            for k, (start, size) in enumerate(zip(starts, sizes)):
                if size == 0:
                    layer_indices.append((empty, empty))
                    continue
                rows, cols = linear_sum_assignment(layer_cost[k, :, start:start + size])
                layer_indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
            indices.append(layer_indices)
        return indices
