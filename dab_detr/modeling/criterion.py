"""Set-prediction loss of DAB-DETR: Hungarian matching, then focal, L1 and GIoU losses."""
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from .matcher import HungarianMatcher


def _num_boxes_across_processes(targets: List[Dict], device: torch.device) -> float:
    """Average number of target boxes per process, at least 1 (the DETR normalizer)."""
    num_boxes = torch.as_tensor(
        [float(sum(len(t["labels"]) for t in targets))], dtype=torch.float32, device=device
    )
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(num_boxes)
        num_boxes = num_boxes / dist.get_world_size()
    return num_boxes.clamp(min=1).item()


class SetCriterion(nn.Module):
    """Losses of a set of predictions against the targets, for the final and auxiliary outputs.

    For each output (final, each auxiliary decoder layer, and the two-stage encoder proposals)
    the predictions are matched to the targets again and three losses are computed, each summed
    and divided by the number of target boxes (averaged over processes):

    - ``loss_class``: sigmoid focal loss over all queries and classes (unmatched queries have an
      all-zero target);
    - ``loss_bbox``: L1 on normalized (cx, cy, w, h) of matched pairs;
    - ``loss_giou``: 1 - GIoU of matched pairs.

    The losses are returned already multiplied by ``weight_dict`` (auxiliary ones use the same
    weights). The number of classes is read from the logits, so the criterion cannot disagree
    with the model's class head.

    Args:
        matcher: assigns queries to targets.
        weight_dict: weight of ``loss_class``, ``loss_bbox`` and ``loss_giou``.
        focal_alpha, focal_gamma: focal loss parameters.
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        weight_dict: Dict[str, float] = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        self.matcher = matcher
        weight_dict = dict(weight_dict or {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0})
        unknown = set(weight_dict) - {"loss_class", "loss_bbox", "loss_giou"}
        if unknown:
            raise ValueError(
                f"SetCriterion: unknown loss names in weight_dict: {sorted(unknown)}; "
                "expected loss_class, loss_bbox, loss_giou"
            )
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def single_output_losses(
        self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, targets: List[Dict], num_boxes: float
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Unweighted losses of one output.

        Args:
            pred_logits: [B, Q, C]; pred_boxes: [B, Q, 4] normalized (cx, cy, w, h).
            targets: B dicts with ``labels`` [N_k] int64 and ``boxes`` [N_k, 4] normalized (cx, cy, w, h).
            num_boxes: the normalizer.

        Returns:
            (losses, metrics): losses ``loss_class``, ``loss_bbox``, ``loss_giou`` (scalars);
            metrics ``class_error`` (percent of matched queries whose top class is wrong).
        """
        # losses in float32 even when the network runs under autocast (fp16 focal terms underflow)
        pred_logits, pred_boxes = pred_logits.float(), pred_boxes.float()
        indices = self.matcher(pred_logits, pred_boxes, targets)
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(pred_logits.device)
        query_idx = torch.cat([q for q, _ in indices]).to(pred_logits.device)
        matched_labels = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)])
        matched_tgt_boxes = torch.cat(
            [t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)]
        ).float()

        onehot = torch.zeros_like(pred_logits)
        onehot[batch_idx, query_idx, matched_labels] = 1.0
        loss_class = sigmoid_focal_loss(
            pred_logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        ) / num_boxes

        src_boxes = pred_boxes[batch_idx, query_idx]
        loss_bbox = F.l1_loss(src_boxes, matched_tgt_boxes, reduction="sum") / num_boxes
        giou = torch.diag(
            generalized_box_iou(
                box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(matched_tgt_boxes, "cxcywh", "xyxy")
            )
        )
        loss_giou = (1 - giou).sum() / num_boxes

        with torch.no_grad():
            if len(matched_labels):
                correct = pred_logits[batch_idx, query_idx].argmax(-1) == matched_labels
                class_error = 100.0 - 100.0 * correct.float().mean()
            else:
                class_error = torch.zeros((), device=pred_logits.device)
        losses = {"loss_class": loss_class, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        return losses, {"class_error": class_error}

    def forward(self, outputs: Dict, targets: List[Dict]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Weighted losses of all outputs.

        Args:
            outputs: ``pred_logits`` [B, Q, C], ``pred_boxes`` [B, Q, 4] (normalized cx, cy, w, h),
                optional ``aux_outputs`` (list of such dicts, one per earlier decoder layer) and
                ``enc_outputs`` (one such dict, two-stage proposals).
            targets: B dicts with ``labels`` [N_k] and ``boxes`` [N_k, 4] normalized (cx, cy, w, h).

        Returns:
            (losses, metrics). Loss keys: ``loss_class``, ``loss_bbox``, ``loss_giou`` for the final
            output, the same with suffix ``_0`` .. ``_{n-1}`` for auxiliary outputs and ``_enc``
            for encoder proposals. Metrics (detached, not losses): ``class_error``.
        """
        num_boxes = _num_boxes_across_processes(targets, outputs["pred_logits"].device)
        named_outputs = [("", outputs)]
        named_outputs += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if "enc_outputs" in outputs:
            named_outputs.append(("_enc", outputs["enc_outputs"]))

        losses, metrics = {}, {}
        for suffix, out in named_outputs:
            out_losses, out_metrics = self.single_output_losses(
                out["pred_logits"], out["pred_boxes"], targets, num_boxes
            )
            for name, value in out_losses.items():
                losses[name + suffix] = value * self.weight_dict.get(name, 0.0)
            if suffix == "":
                metrics.update(out_metrics)
        return losses, metrics
