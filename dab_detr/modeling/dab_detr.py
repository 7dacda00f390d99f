"""DAB-DETR as a Detectron2 meta-architecture: its modules, its config and its ``predict``; the
Detectron2 side it shares with DAB-Deformable-DETR is ``set_prediction_detector``."""
from typing import Dict, List, Mapping, Optional

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone

from ..precision import run_in_fp32
from .anchors import AnchorBoxes
from .box_ops import inverse_sigmoid
from .criterion import SetCriterion
from .denoising import build_denoising_queries, denoising_settings, matching_content, split_denoising_outputs
from .mlp import MLP
from .position_encoding import PositionEmbeddingSine
from .set_prediction_detector import SetPredictionDetector, criterion_from_config, shared_from_config
from .transformer import DABTransformer

__all__ = ["DABDETR", "SetPredictionDetector", "criterion_from_config"]  # the last two re-exported


@META_ARCH_REGISTRY.register()
class DABDETR(SetPredictionDetector):
    """DAB-DETR: DETR whose decoder queries are dynamic anchor boxes refined layer by layer.

    Input (Detectron2's contract): a list of dicts, one per image, with ``image`` [C, H, W] in
    ``input_format`` (0-255), optionally ``height``/``width`` (the size to report boxes in) and,
    in training, ``instances`` with ``gt_boxes`` (absolute x0, y0, x1, y1 in the ``image``'s
    coordinates) and ``gt_classes``.

    Output: in training, a dict of weighted losses (``loss_class``, ``loss_bbox``, ``loss_giou``
    and ``_0``..``_4`` for the auxiliary layers); diagnostics such as ``class_error`` are kept
    in ``training_metrics`` (detached tensors of the last training forward), which
    ``DETRTrainLoop`` logs to the event storage. In evaluation, one ``{"instances": Instances}``
    per image with ``pred_boxes``, ``scores`` and ``pred_classes``, the top
    ``select_box_nums_for_evaluation`` (query, class) pairs, in the requested ``height`` x
    ``width`` (boxes are scaled, not clipped, as in the original).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_feature: str = "res5",
        position_embedding: nn.Module,
        transformer: DABTransformer,
        criterion: SetCriterion,
        num_classes: int,
        num_queries: int = 300,
        aux_loss: bool = True,
        random_refpoints_xy: bool = False,
        freeze_anchor_xy: bool = False,
        select_box_nums_for_evaluation: int = 300,
        pixel_mean: List[float] = (123.675, 116.28, 103.53),
        pixel_std: List[float] = (58.395, 57.12, 57.375),
        input_format: str = "RGB",
        clip_boxes_to_image: bool = False,
        fast_backbone: bool = True,
        denoising: Optional[Mapping] = None,
    ):
        """
        Args:
            backbone: any Detectron2 backbone; ``in_feature`` names the output map to use (its
                channel count is read from ``backbone.output_shape()``).
            position_embedding: image position embedding, e.g. ``PositionEmbeddingSine``.
            transformer: the encoder-decoder; its ``d_model`` sets the hidden size of the heads.
            criterion: the set loss (weights included).
            num_classes: number of object classes (no background); the only place it is set.
            num_queries: number of learned anchors (x num_patterns decoder queries).
            aux_loss: also supervise the earlier decoder layers.
            random_refpoints_xy, freeze_anchor_xy: see ``AnchorBoxes``.
            select_box_nums_for_evaluation: detections kept per image at inference.
            pixel_mean, pixel_std: normalization in the 0-255 scale of ``input_format``.
            clip_boxes_to_image: clip the output boxes to the reported image size (MMDetection's
                post-processing); off as in the original.
            fast_backbone: fold frozen BN into the convs and use NHWC conv weights (see
                ``SetPredictionDetector``); False keeps the backbone as built.
            denoising: None (DAB-DETR), or DN-DETR's query denoising: a dict of
                ``DenoisingSettings`` fields (``groups``, ``label_noise_scale``,
                ``box_noise_scale``). Adds ``label_enc`` [num_classes + 1, hidden - 1], whose
                "unknown" row is the content query of the matching queries in training and
                inference (see ``dab_detr.modeling.denoising``).
        """
        shapes = backbone.output_shape()
        if in_feature not in shapes:
            raise ValueError(
                f"DABDETR: in_feature={in_feature!r} is not an output of the backbone "
                f"{type(backbone).__name__}; it has {sorted(shapes)}"
            )
        super().__init__(backbone=backbone, criterion=criterion, num_classes=num_classes, aux_loss=aux_loss,
                         select_box_nums_for_evaluation=select_box_nums_for_evaluation,
                         pixel_mean=pixel_mean, pixel_std=pixel_std, input_format=input_format,
                         clip_boxes_to_image=clip_boxes_to_image, fast_backbone=fast_backbone)
        self.in_feature = in_feature
        self.position_embedding = position_embedding
        self.transformer = transformer

        hidden_dim = transformer.d_model
        self.input_proj = nn.Conv2d(shapes[in_feature].channels, hidden_dim, kernel_size=1)
        self.refpoint_embed = AnchorBoxes(num_queries, random_xy=random_refpoints_xy, freeze_xy=freeze_anchor_xy)
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.init_heads(self.class_embed, self.bbox_embed)
        self.denoising = denoising_settings(denoising)
        if self.denoising is not None:
            self.label_enc = nn.Embedding(num_classes + 1, hidden_dim - 1)

    @classmethod
    def from_config(cls, cfg):
        """Build from a yacs config extended by ``dab_detr.add_dab_detr_config``."""
        c = cfg.MODEL.DAB_DETR
        transformer = DABTransformer(
            d_model=c.HIDDEN_DIM, nhead=c.NHEADS, num_encoder_layers=c.ENC_LAYERS,
            num_decoder_layers=c.DEC_LAYERS, dim_feedforward=c.DIM_FEEDFORWARD, dropout=c.DROPOUT,
            activation=c.ACTIVATION, num_patterns=c.NUM_PATTERNS, modulate_hw_attn=c.MODULATE_HW_ATTN,
            keep_query_pos=c.KEEP_QUERY_POS,
        )
        position_embedding = PositionEmbeddingSine(
            num_pos_feats=c.HIDDEN_DIM // 2, temperature_h=c.PE_TEMPERATURE_H, temperature_w=c.PE_TEMPERATURE_W,
        )
        return {
            **shared_from_config(cfg, c),
            "in_feature": c.IN_FEATURE,
            "position_embedding": position_embedding,
            "transformer": transformer,
        }

    # ------------------------------------------------------------------ core
    def predict(self, images: torch.Tensor, padding_mask: torch.Tensor, padded: bool = True,
                targets: Optional[List[Dict]] = None) -> Dict:
        """Run the network on a normalized, padded batch.

        Args:
            images: [B, 3, H, W] normalized images, zero-padded at the bottom and right.
            padding_mask: [B, H, W] bool, True on padded pixels.
            padded: False when the caller knows that no pixel is padding (``padding_mask`` is all
                False): the attention layers then attend without a mask, which is the same
                attention without the masking work.
            targets: in training with denoising, the ground truth (``prepare_targets``) to noise.

        Returns:
            ``pred_logits`` [B, Q, C] and ``pred_boxes`` [B, Q, 4] (normalized cx, cy, w, h) of the
            last decoder layer, and ``aux_outputs``: the same for each earlier layer, first to last.
            With denoising queries also ``dn_outputs`` (``split_denoising_outputs``): their
            predictions at every layer and the ground truth they reconstruct.
        """
        features = self.backbone(images)[self.in_feature]
        # the mask follows the feature map by nearest interpolation, in training and inference
        mask = F.interpolate(padding_mask[None].float(), size=features.shape[-2:])[0].to(torch.bool)
        image_pos = self.position_embedding(mask).to(features.dtype)
        anchors = self.refpoint_embed()
        content, dn = None, None
        if self.denoising is not None:
            content = matching_content(self.label_enc)
            if self.training and targets is not None and self.denoising.groups > 0:
                num_matching = anchors.shape[0] * max(1, self.transformer.num_patterns)
                dn = build_denoising_queries(targets, self.label_enc, self.denoising, self.num_classes, num_matching)
        hidden, references = self.transformer(
            self.input_proj(features), mask if padded else None, image_pos, anchors, self.bbox_embed,
            matching_content=content, denoising=dn,
        )
        # the heads in fp32 under bf16/fp16 autocast: their rounding moved scores and boxes
        # (dab_detr/precision.py); outside autocast these are the plain calls
        logits = run_in_fp32(self.class_embed, hidden)
        # each layer's box is predicted relative to the anchor that layer started from
        boxes = (run_in_fp32(self.bbox_embed, hidden) + inverse_sigmoid(references)).sigmoid()
        logits, boxes, dn_outputs = split_denoising_outputs(logits, boxes, dn)
        outputs = {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "aux_outputs": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])],
        }
        if dn_outputs is not None:
            outputs["dn_outputs"] = dn_outputs
        return outputs
