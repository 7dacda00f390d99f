"""Query denoising (DN-DETR, Li et al., CVPR 2022) for the DAB decoders.

In training, ``groups`` copies of every ground-truth box, each with its label randomly flipped
and its box randomly shifted and resized, are fed to the decoder in front of the matching
queries. Each noised query must reconstruct its original box and label (losses computed by
``SetCriterion`` from ``dn_outputs``), with no Hungarian matching: the decoder learns to refine
a box it is given, which stabilizes the matching and speeds up training.

The content query of every decoder query comes from one label embedding ``label_enc``
(``num_classes + 1`` rows of ``hidden - 1`` values, plus one indicator value: 1 for denoising
queries, 0 for matching queries). Denoising queries embed their (noised) label; matching
queries, and every query at inference, embed the extra "unknown" label (row ``num_classes``).

Everything here follows DN-DETR's ``models/DN_DAB_DETR/dn_components.py`` (commit ff3902a); the
places where the code rather than the paper is followed are marked. Pure torch; boxes are
normalized (cx, cy, w, h), anchors in logit space.
"""
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from .box_ops import inverse_sigmoid

__all__ = [
    "DenoisingSettings",
    "DenoisingQueries",
    "denoising_settings",
    "matching_content",
    "noised_ground_truth",
    "denoising_attention_mask",
    "build_denoising_queries",
    "split_denoising_outputs",
]


@dataclass(frozen=True)
class DenoisingSettings:
    """The denoising options (DN-DETR's ``--scalar``, ``--label_noise_scale``, ``--box_noise_scale``).

    Attributes:
        groups: noised copies of the ground truth per image (5). 0 keeps the DN architecture (the
            label-embedding content queries) but trains without denoising queries.
        label_noise_scale: probability that a copy's label is replaced by a uniformly random class (0.2).
        box_noise_scale: the largest centre shift, as a fraction of half the box size, and the
            largest size change, as a fraction of the size (0.4).
    """

    groups: int = 5
    label_noise_scale: float = 0.2
    box_noise_scale: float = 0.4

    def __post_init__(self):
        if self.groups < 0:
            raise ValueError(f"model.denoising.groups must be >= 0, got {self.groups}")
        if not 0.0 <= self.label_noise_scale <= 1.0:
            raise ValueError(f"model.denoising.label_noise_scale must be in [0, 1], got {self.label_noise_scale}")
        if self.box_noise_scale < 0.0:
            raise ValueError(f"model.denoising.box_noise_scale must be >= 0, got {self.box_noise_scale}")


def denoising_settings(value: Union[None, Mapping, DenoisingSettings]) -> Optional[DenoisingSettings]:
    """``model.denoising`` of a config (None = off, a dict of ``DenoisingSettings`` fields, or one)."""
    if value is None or isinstance(value, DenoisingSettings):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"groups", "label_noise_scale", "box_noise_scale"})
        if unknown:
            raise ValueError(f"model.denoising: unknown settings {unknown}; expected groups, "
                             "label_noise_scale, box_noise_scale")
        return DenoisingSettings(**dict(value))
    raise TypeError(f"model.denoising must be None or a dict of groups, label_noise_scale, box_noise_scale; "
                    f"got {type(value).__name__}")


def matching_content(label_enc: nn.Embedding) -> torch.Tensor:
    """[d] the content query of every matching query: the "unknown" label's embedding (the last
    row of ``label_enc``) followed by the indicator 0 (as the original's ``tgt``)."""
    unknown = label_enc.weight[-1]
    return torch.cat([unknown, unknown.new_zeros(1)])


def noised_ground_truth(labels: torch.Tensor, boxes: torch.Tensor, settings: DenoisingSettings, num_classes: int):
    """Noised copies of the ground truth (the original's label flipping and box jitter).

    Args:
        labels: [N] int64 class ids in [0, num_classes); boxes: [N, 4] normalized (cx, cy, w, h).

    Returns:
        (labels [N], boxes [N, 4]): each label replaced with probability ``label_noise_scale`` by
        a uniformly random class (which may be the same one); each box's centre moved by up to
        ``box_noise_scale`` x half its size and its width and height changed by up to
        ``box_noise_scale`` x themselves (uniform, independently per coordinate), then clamped to
        [0, 1] (each coordinate, as the original: the box may leave the image).
    """
    if settings.label_noise_scale > 0:
        # torch.where rather than indexing by the flipped positions: no device-to-host wait
        flip = torch.rand(labels.shape, device=labels.device) < settings.label_noise_scale
        labels = torch.where(flip, torch.randint_like(labels, 0, num_classes), labels)
    if settings.box_noise_scale > 0:
        half_then_full = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], dim=1)
        noise = torch.rand_like(boxes) * 2 - 1.0
        boxes = (boxes + noise * half_then_full * settings.box_noise_scale).clamp(min=0.0, max=1.0)
    return labels, boxes


def denoising_attention_mask(groups: int, group_size: int, num_matching: int, device=None) -> torch.Tensor:
    """[T, T] bool decoder self-attention mask, True = may NOT attend; T = groups * group_size + num_matching.

    Queries are ordered group 0, ..., group ``groups - 1`` (``group_size`` each), then the matching
    queries. The matching queries see only each other (they must not learn from the ground truth
    carried by the denoising queries); a denoising query sees its own group and the matching
    queries, not the other groups.
    """
    pad_size = groups * group_size
    total = pad_size + num_matching
    group = torch.arange(pad_size, device=device) // max(group_size, 1)  # each denoising slot's group
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[:pad_size, :pad_size] = group[:, None] != group[None, :]
    mask[pad_size:, :pad_size] = True
    return mask


@dataclass
class DenoisingQueries:
    """The denoising queries of one batch, placed in front of the matching queries.

    Attributes:
        content: [B, P, d] content queries (noised label embedding + indicator 1; zeros in the
            padding slots of images with fewer boxes than the largest one).
        anchors_logit: [B, P, 4] anchors, inverse sigmoid of the noised boxes (0, i.e. the box
            (0.5, 0.5, 0.5, 0.5), in padding slots).
        attn_mask: [P + Q', P + Q'] bool, see ``denoising_attention_mask``.
        batch_idx, query_idx: [M] image and slot (in [0, P)) of each real denoising query,
            M = groups x total boxes, group-major then image then box (the original's order).
        labels, boxes: [M] and [M, 4] what each must reconstruct: the un-noised ground truth.
    """

    content: torch.Tensor
    anchors_logit: torch.Tensor
    attn_mask: torch.Tensor
    batch_idx: torch.Tensor
    query_idx: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor

    @property
    def pad_size(self) -> int:
        return self.content.shape[1]


def build_denoising_queries(targets: List[Dict], label_enc: nn.Embedding, settings: DenoisingSettings,
                            num_classes: int, num_matching: int) -> DenoisingQueries:
    """Noise the ground truth ``settings.groups`` times and lay the copies out as decoder queries.

    Args:
        targets: B dicts with ``labels`` [N_k] and ``boxes`` [N_k, 4] normalized (cx, cy, w, h).
        label_enc: [num_classes + 1, d - 1] label embedding.
        num_matching: Q', the number of matching queries after the denoising ones.

    Each group has ``max_k N_k`` slots per image (the original pads every image's group to the
    largest image's box count); box j of image k in group g is slot ``g * max_k N_k + j``.
    """
    groups = settings.groups
    device = label_enc.weight.device
    counts = [len(t["labels"]) for t in targets]
    group_size = max(counts, default=0)
    labels = torch.cat([t["labels"] for t in targets]).repeat(groups)
    boxes = torch.cat([t["boxes"] for t in targets]).repeat(groups, 1)
    # built on the device from Python numbers (no host-to-device copy, which would wait for a GPU)
    batch_idx = torch.cat([torch.full((n,), k, dtype=torch.int64, device=device) for k, n in enumerate(counts)])
    batch_idx = batch_idx.repeat(groups)
    in_image = torch.cat([torch.arange(n, device=device) for n in counts])
    query_idx = torch.cat([in_image + g * group_size for g in range(groups)]) if groups else in_image[:0]

    noised_labels, noised_boxes = noised_ground_truth(labels, boxes, settings, num_classes)
    embedded = label_enc(noised_labels)
    embedded = torch.cat([embedded, embedded.new_ones(len(embedded), 1)], dim=1)  # indicator 1
    pad_size = groups * group_size
    content = embedded.new_zeros(len(targets), pad_size, embedded.shape[1])
    anchors = embedded.new_zeros(len(targets), pad_size, 4)
    content[batch_idx, query_idx] = embedded
    # inverse sigmoid with the original's clamp 1e-3 (its util.misc.inverse_sigmoid)
    anchors[batch_idx, query_idx] = inverse_sigmoid(noised_boxes).to(anchors.dtype)
    return DenoisingQueries(
        content=content, anchors_logit=anchors,
        attn_mask=denoising_attention_mask(groups, group_size, num_matching, device),
        batch_idx=batch_idx, query_idx=query_idx, labels=labels, boxes=boxes,
    )


def split_denoising_outputs(logits: torch.Tensor, boxes: torch.Tensor, dn: Optional[DenoisingQueries]):
    """Separate the decoder's outputs into the matching part and the denoising predictions.

    Args:
        logits: [L, B, P + Q', C]; boxes: [L, B, P + Q', 4] (every decoder layer).
        dn: the batch's denoising queries, or None (then nothing is split off).

    Returns:
        (logits [L, B, Q', C], boxes [L, B, Q', 4], dn_outputs or None). ``dn_outputs`` holds
        ``pred_logits`` [L, M, C] and ``pred_boxes`` [L, M, 4] of the M real denoising queries (no
        padding slot) and their targets ``labels`` [M], ``boxes`` [M, 4].
    """
    if dn is None:
        return logits, boxes, None
    pad = dn.pad_size
    dn_outputs = {
        "pred_logits": logits[:, dn.batch_idx, dn.query_idx],
        "pred_boxes": boxes[:, dn.batch_idx, dn.query_idx],
        "labels": dn.labels,
        "boxes": dn.boxes,
    }
    return logits[:, :, pad:], boxes[:, :, pad:], dn_outputs
