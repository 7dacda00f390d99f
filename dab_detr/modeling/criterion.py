"""Set-prediction loss of DAB-DETR: Hungarian matching, then focal, L1 and GIoU losses."""
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchvision.ops import box_convert, sigmoid_focal_loss

from .box_ops import paired_generalized_box_iou
from .matcher import HungarianMatcher


def _num_boxes_across_processes(targets: List[Dict], device: torch.device) -> float:
    """Average number of target boxes per process, at least 1 (the DETR normalizer).

    A Python number from the targets' sizes; only with several processes is it all-reduced
    through a device tensor (the one wait for the device this needs, as in the original).
    """
    num_boxes = float(sum(len(t["labels"]) for t in targets))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = torch.tensor([num_boxes], dtype=torch.float32, device=device)
        dist.all_reduce(total)
        num_boxes = total.item() / dist.get_world_size()
    return max(num_boxes, 1.0)


class SetCriterion(nn.Module):
    """Losses of a set of predictions against the targets, for the final and auxiliary outputs.

    For each output (final, each auxiliary decoder layer, and the two-stage encoder proposals)
    the predictions are matched to the targets again and three losses are computed, each summed
    and divided by the number of target boxes (averaged over processes):

    - ``loss_class``: sigmoid focal loss over all queries and classes (unmatched queries have an
      all-zero target);
    - ``loss_bbox``: L1 on normalized (cx, cy, w, h) of matched pairs;
    - ``loss_giou``: 1 - GIoU of matched pairs.

    With query denoising (DN-DETR), the outputs' ``dn_outputs`` add the reconstruction losses
    ``loss_class_dn``, ``loss_bbox_dn``, ``loss_giou_dn`` of every decoder layer: the same three
    losses of each denoising query against the ground truth it was noised from (no matching),
    divided by the number of denoising queries (see ``denoising_losses``).

    The losses are returned already multiplied by ``weight_dict`` (auxiliary ones use the same
    weights; a denoising loss the weight of its matching loss unless set). The number of classes
    is read from the logits, so the criterion cannot disagree with the model's class head.

    Args:
        matcher: assigns queries to targets.
        weight_dict: weight of ``loss_class``, ``loss_bbox`` and ``loss_giou`` (and optionally
            of ``loss_class_dn``, ``loss_bbox_dn``, ``loss_giou_dn``).
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
        matching = ("loss_class", "loss_bbox", "loss_giou")
        unknown = set(weight_dict) - set(matching) - {name + "_dn" for name in matching}
        if unknown:
            raise ValueError(
                f"SetCriterion: unknown loss names in weight_dict: {sorted(unknown)}; "
                "expected loss_class, loss_bbox, loss_giou (and their _dn denoising versions)"
            )
        for name in matching:  # DN-DETR weights each reconstruction loss as its matching loss
            weight_dict.setdefault(name + "_dn", weight_dict.get(name, 0.0))
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def layer_losses(
        self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, targets: List[Dict], num_boxes: float
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Unweighted losses of L outputs at once (the decoder layers), each matched on its own.

        The losses of each layer as if computed on that layer alone, in one batched pass over
        all layers (one matching cost, one focal loss, one gather of the matched boxes)
        instead of one pass per layer: the small-tensor work of the set loss is a large part of
        a training step on small models.

        Args:
            pred_logits: [L, B, Q, C]; pred_boxes: [L, B, Q, 4] normalized (cx, cy, w, h).
            targets: B dicts with ``labels`` [N_k] int64 and ``boxes`` [N_k, 4] normalized (cx, cy, w, h).
            num_boxes: the normalizer.

        Returns:
            (losses, metrics): ``loss_class``, ``loss_bbox``, ``loss_giou`` as [L] tensors;
            ``class_error`` of the last layer.
        """
        # losses in float32 even when the network runs under autocast (fp16 focal terms underflow)
        pred_logits, pred_boxes = pred_logits.float(), pred_boxes.float()
        num_layers, batch = pred_logits.shape[:2]
        indices = self.matcher.match_layers(pred_logits, pred_boxes, targets)
        pairs = [pair for layer in indices for pair in layer]  # layer-major, then image
        counts = [len(q) for q, _ in pairs]
        matches_per_layer = sum(counts[:batch])  # every layer matches min(Q, N_k) pairs in image k
        starts = torch.tensor([0] + [len(t["labels"]) for t in targets[:-1]]).cumsum(0)
        layer_image = torch.arange(num_layers * batch).repeat_interleave(torch.tensor(counts, dtype=torch.int64))
        image_idx = layer_image % batch
        index = torch.stack([
            layer_image // batch,
            image_idx,
            torch.cat([q for q, _ in pairs]),
            torch.cat([j for _, j in pairs]) + starts[image_idx],  # row in the concatenated targets
        ]).to(pred_logits.device)
        layer_idx, batch_idx, query_idx, target_idx = index.unbind(0)
        matched_labels = torch.cat([t["labels"] for t in targets])[target_idx]
        matched_tgt_boxes = torch.cat([t["boxes"] for t in targets])[target_idx].float()

        onehot = torch.zeros_like(pred_logits)
        onehot[layer_idx, batch_idx, query_idx, matched_labels] = 1.0
        loss_class = sigmoid_focal_loss(
            pred_logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none"
        ).flatten(1).sum(1) / num_boxes

        src_boxes = pred_boxes[layer_idx, batch_idx, query_idx]
        loss_bbox = (src_boxes - matched_tgt_boxes).abs().view(num_layers, 4 * matches_per_layer).sum(1) / num_boxes
        giou = paired_generalized_box_iou(
            box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(matched_tgt_boxes, "cxcywh", "xyxy")
        )
        loss_giou = (1 - giou).view(num_layers, matches_per_layer).sum(1) / num_boxes

        with torch.no_grad():
            if matches_per_layer:
                last = slice(len(query_idx) - matches_per_layer, None)  # the last layer's pairs
                correct = pred_logits[-1, batch_idx[last], query_idx[last]].argmax(-1) == matched_labels[last]
                class_error = 100.0 - 100.0 * correct.float().mean()
            else:
                class_error = torch.zeros((), device=pred_logits.device)
        losses = {"loss_class": loss_class, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        return losses, {"class_error": class_error}

    def denoising_losses(self, dn_outputs: Dict) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Unweighted reconstruction losses of the denoising queries at L decoder layers.

        Args:
            dn_outputs: ``pred_logits`` [L, M, C], ``pred_boxes`` [L, M, 4] (normalized cx, cy,
                w, h) of the M denoising queries, ``labels`` [M] and ``boxes`` [M, 4] the ground
                truth each was noised from.

        Returns:
            (losses, metrics): ``loss_class``, ``loss_bbox``, ``loss_giou`` as [L] tensors, each
            summed over queries (and classes) and divided by M, as DN-DETR's ``compute_dn_loss``
            (M of this process, not averaged over processes; all zeros when M = 0);
            ``class_error`` of the last layer.
        """
        pred_logits, pred_boxes = dn_outputs["pred_logits"].float(), dn_outputs["pred_boxes"].float()
        labels, tgt_boxes = dn_outputs["labels"], dn_outputs["boxes"].float()
        num_layers, num_queries = pred_logits.shape[:2]
        normalizer = float(max(num_queries, 1))
        onehot = torch.zeros_like(pred_logits)
        onehot[:, torch.arange(num_queries, device=labels.device), labels] = 1.0
        loss_class = sigmoid_focal_loss(
            pred_logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none"
        ).flatten(1).sum(1) / normalizer
        loss_bbox = (pred_boxes - tgt_boxes).abs().flatten(1).sum(1) / normalizer
        giou = paired_generalized_box_iou(
            box_convert(pred_boxes.flatten(0, 1), "cxcywh", "xyxy"),
            box_convert(tgt_boxes.repeat(num_layers, 1), "cxcywh", "xyxy"),
        )
        loss_giou = (1 - giou).view(num_layers, num_queries).sum(1) / normalizer
        with torch.no_grad():
            if num_queries:
                class_error = 100.0 - 100.0 * (pred_logits[-1].argmax(-1) == labels).float().mean()
            else:
                class_error = torch.zeros((), device=pred_logits.device)
        return {"loss_class": loss_class, "loss_bbox": loss_bbox, "loss_giou": loss_giou}, {"class_error": class_error}

    def forward(self, outputs: Dict, targets: List[Dict]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Weighted losses of all outputs.

        Args:
            outputs: ``pred_logits`` [B, Q, C], ``pred_boxes`` [B, Q, 4] (normalized cx, cy, w, h),
                optional ``aux_outputs`` (list of such dicts, one per earlier decoder layer) and
                ``enc_outputs`` (one such dict, two-stage proposals) and ``dn_outputs`` (query
                denoising, see ``denoising_losses``; its last 1 + len(aux_outputs) layers are used).
            targets: B dicts with ``labels`` [N_k] and ``boxes`` [N_k, 4] normalized (cx, cy, w, h).

        Returns:
            (losses, metrics). Loss keys: ``loss_class``, ``loss_bbox``, ``loss_giou`` for the final
            output, the same with suffix ``_0`` .. ``_{n-1}`` for auxiliary outputs and ``_enc``
            for encoder proposals; with ``dn_outputs`` also ``loss_class_dn``, ``loss_bbox_dn``,
            ``loss_giou_dn`` and the same with ``_0`` .. ``_{n-1}`` for the earlier layers.
            Metrics (detached, not losses): ``class_error`` (and ``class_error_dn``).
        """
        # the losses and the matching in fp32, autocast off: the network may run under bf16/fp16
        # autocast, the set loss never does (layer_losses casts the predictions to float)
        with torch.autocast(outputs["pred_logits"].device.type, enabled=False):
            return self._weighted_losses(outputs, targets)

    def _weighted_losses(self, outputs: Dict, targets: List[Dict]):
        num_boxes = _num_boxes_across_processes(targets, outputs["pred_logits"].device)
        # the decoder layers (auxiliary first, the final output last) in one batched pass
        decoder_outputs = list(outputs.get("aux_outputs", [])) + [outputs]
        suffixes = [f"_{i}" for i in range(len(decoder_outputs) - 1)] + [""]
        groups = [(suffixes, decoder_outputs)]
        if "enc_outputs" in outputs:
            groups.append((["_enc"], [outputs["enc_outputs"]]))

        losses, metrics = {}, {}
        for group_suffixes, group in groups:
            group_losses, group_metrics = self.layer_losses(
                torch.stack([o["pred_logits"] for o in group]), torch.stack([o["pred_boxes"] for o in group]),
                targets, num_boxes,
            )
            for name, values in group_losses.items():
                for suffix, value in zip(group_suffixes, values.unbind(0)):
                    losses[name + suffix] = value * self.weight_dict.get(name, 0.0)
            if group_suffixes[-1] == "":
                metrics.update(group_metrics)
        if "dn_outputs" in outputs:
            # the layers the matching losses supervise: the last one, or all with aux_outputs
            dn = outputs["dn_outputs"]
            layers = slice(-len(decoder_outputs), None)
            dn_losses, dn_metrics = self.denoising_losses(
                {**dn, "pred_logits": dn["pred_logits"][layers], "pred_boxes": dn["pred_boxes"][layers]}
            )
            for name, values in dn_losses.items():
                for suffix, value in zip(suffixes, values.unbind(0)):
                    losses[f"{name}_dn{suffix}"] = value * self.weight_dict[name + "_dn"]
            metrics["class_error_dn"] = dn_metrics["class_error"]
        return losses, metrics
