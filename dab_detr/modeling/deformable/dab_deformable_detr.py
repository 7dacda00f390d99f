"""DAB-Deformable-DETR as a Detectron2 meta-architecture.

The network core (multi-level inputs, deformable transformer, per-layer heads) is here; the
Detectron2 side (image batching, padding masks, targets from ``Instances``, loss logging, results
as ``Instances``) is DAB-DETR's: both inherit :class:`~dab_detr.modeling.set_prediction_detector.SetPredictionDetector`.
"""
import copy
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone

from ...precision import run_in_fp32
from ..anchors import AnchorBoxes
from ..criterion import SetCriterion
from ..set_prediction_detector import SetPredictionDetector, shared_from_config
from ..denoising import build_denoising_queries, denoising_settings, split_denoising_outputs
from ..mlp import MLP
from ..position_encoding import PositionEmbeddingSine
from .deformable_transformer import DABDeformableTransformer

__all__ = ["DABDeformableDETR"]


@META_ARCH_REGISTRY.register()
class DABDeformableDETR(SetPredictionDetector):
    """DAB-Deformable-DETR: Deformable DETR whose decoder queries are dynamic 4-D anchor boxes.

    Multi-scale features (the backbone's ``in_features`` projected by 1x1 conv + GroupNorm, plus
    extra levels made by a 3x3 stride-2 conv + GroupNorm, the first one on the raw last backbone
    map), a deformable encoder, the DAB decoder with deformable cross-attention around each
    anchor box, and one independent class head and box head per decoder layer (box refinement).

    Inputs and outputs follow Detectron2's contract exactly as :class:`DABDETR` (see there):
    a dict of weighted losses in training (``loss_class``, ``loss_bbox``, ``loss_giou``, suffixes
    ``_0``..``_4`` for earlier layers and ``_enc`` for two-stage proposals), and one
    ``{"instances"}`` per image at inference with the top ``select_box_nums_for_evaluation``
    (query, class) pairs (100 in the original).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_features: Sequence[str] = ("res3", "res4", "res5"),
        position_embedding: nn.Module,
        transformer: DABDeformableTransformer,
        criterion: SetCriterion,
        num_classes: int,
        num_queries: int = 300,
        num_patterns: int = 0,
        aux_loss: bool = True,
        random_refpoints_xy: bool = False,
        freeze_anchor_xy: bool = False,
        select_box_nums_for_evaluation: int = 100,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
        input_format: str = "RGB",
        fast_backbone: bool = True,
        denoising: Optional[Mapping] = None,
    ):
        """
        Args:
            backbone: a Detectron2 backbone with the outputs named in ``in_features``.
            in_features: backbone maps used as the finest levels (C3, C4, C5); the transformer's
                remaining ``num_feature_levels - len(in_features)`` levels are extra stride-2 convs.
            position_embedding: image position embedding (sine, offset -0.5, temperature 10000).
            transformer: :class:`DABDeformableTransformer`; its ``two_stage`` flag selects the
                query source (learned anchors and content queries, or encoder proposals).
            criterion: the set loss (weights included).
            num_classes: number of classes (no background); 91 for the original checkpoint.
            num_queries: learned anchors (one-stage) or kept proposals (two-stage).
            num_patterns: >0 tiles the anchors with that many learned pattern embeddings added to
                the content queries (pattern-major, NQ * num_patterns queries). One-stage only.
            aux_loss: also supervise the earlier decoder layers.
            random_refpoints_xy: anchor centres start uniform in the image. Like the original,
                this does not freeze them; ``freeze_anchor_xy`` does (see ``AnchorBoxes``).
            select_box_nums_for_evaluation: detections per image at inference.
            pixel_mean, pixel_std, input_format: input normalization (0-255 scale).
            fast_backbone: fold frozen BN into the backbone's convs and use NHWC conv weights
                (``SetPredictionDetector``); False keeps the backbone as built.
            denoising: None, or DN-DETR's query denoising (a dict of ``DenoisingSettings``
                fields, see ``dab_detr.modeling.denoising``), one-stage without patterns as in
                DN-DETR. Adds ``label_enc`` [num_classes + 1, C - 1]; the learned content queries
                become C - 1 wide plus the indicator 0 (DN-DAB-Deformable-DETR's ``tgt_embed``).
        """
        in_features = list(in_features)
        shapes = backbone.output_shape()
        missing = [f for f in in_features if f not in shapes]
        if missing:
            raise ValueError(
                f"DABDeformableDETR: in_features {missing} are not outputs of the backbone "
                f"{type(backbone).__name__}; it has {sorted(shapes)}"
            )
        num_levels = transformer.num_feature_levels
        if len(in_features) > num_levels:
            raise ValueError(
                f"DABDeformableDETR: {len(in_features)} in_features but the transformer has only "
                f"{num_levels} feature levels"
            )
        two_stage = transformer.two_stage
        if two_stage and (num_patterns or random_refpoints_xy or freeze_anchor_xy):
            raise ValueError(
                "DABDeformableDETR: num_patterns, random_refpoints_xy and freeze_anchor_xy apply to "
                "learned anchors; the two-stage transformer takes its queries from encoder proposals"
            )
        if denoising is not None and (two_stage or num_patterns):
            raise ValueError(
                "DABDeformableDETR: model.denoising is implemented for the one-stage model without "
                "patterns (as DN-DETR's dn_dab_deformable_detr); set two_stage=False and num_patterns=0"
            )
        if two_stage and transformer.two_stage_num_proposals != num_queries:
            raise ValueError(
                f"DABDeformableDETR: two-stage transformer keeps {transformer.two_stage_num_proposals} "
                f"proposals but num_queries={num_queries}"
            )
        super().__init__(backbone=backbone, criterion=criterion, num_classes=num_classes, aux_loss=aux_loss,
                         select_box_nums_for_evaluation=select_box_nums_for_evaluation,
                         pixel_mean=pixel_mean, pixel_std=pixel_std, input_format=input_format,
                         fast_backbone=fast_backbone)
        self.in_features = in_features
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.num_queries = num_queries
        self.num_patterns = num_patterns
        hidden_dim = transformer.d_model

        # input projections: names input_proj.{level}.{0: conv, 1: GroupNorm} as in the original
        projections = []
        for f in in_features:
            projections.append(nn.Sequential(
                nn.Conv2d(shapes[f].channels, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim)
            ))
        in_channels = shapes[in_features[-1]].channels
        for _ in range(num_levels - len(in_features)):
            projections.append(nn.Sequential(
                nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, hidden_dim)
            ))
            in_channels = hidden_dim
        self.input_proj = nn.ModuleList(projections)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

        # heads: built once, then deep-copied so that every layer starts from the same values
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.init_heads(class_embed, bbox_embed)
        num_heads = transformer.decoder.num_layers + (1 if two_stage else 0)  # +1: proposal heads
        self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_heads))
        self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_heads))
        if not two_stage:
            # the first layer's boxes start smaller than the anchors (original and detrex)
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            self.denoising = denoising_settings(denoising)
            # with denoising, one value of each content query is the indicator (DN-DETR)
            self.tgt_embed = nn.Embedding(num_queries, hidden_dim - (self.denoising is not None))
            self.refpoint_embed = AnchorBoxes(num_queries, random_xy=random_refpoints_xy, freeze_xy=freeze_anchor_xy)
            if num_patterns > 0:
                self.patterns_embed = nn.Embedding(num_patterns, hidden_dim)
            if self.denoising is not None:
                self.label_enc = nn.Embedding(num_classes + 1, hidden_dim - 1)
        else:
            self.denoising = None

    @classmethod
    def from_config(cls, cfg):
        """Build from a yacs config extended by ``add_dab_deformable_detr_config``."""
        c = cfg.MODEL.DAB_DEFORMABLE_DETR
        transformer = DABDeformableTransformer(
            d_model=c.HIDDEN_DIM, nhead=c.NHEADS, num_encoder_layers=c.ENC_LAYERS,
            num_decoder_layers=c.DEC_LAYERS, dim_feedforward=c.DIM_FEEDFORWARD, dropout=c.DROPOUT,
            num_feature_levels=c.NUM_FEATURE_LEVELS, enc_n_points=c.ENC_N_POINTS, dec_n_points=c.DEC_N_POINTS,
            two_stage=c.TWO_STAGE, two_stage_num_proposals=c.NUM_QUERIES,
            layer0_broadcast_bug=c.LAYER0_BROADCAST_BUG,
        )
        position_embedding = PositionEmbeddingSine(
            num_pos_feats=c.HIDDEN_DIM // 2, temperature_h=10000.0, temperature_w=10000.0, offset=-0.5
        )
        return {
            **shared_from_config(cfg, c),
            "in_features": c.IN_FEATURES,
            "position_embedding": position_embedding,
            "transformer": transformer,
            "num_patterns": c.NUM_PATTERNS,
        }

    def queries(self):
        """Learned (content queries [Q', C], anchors [Q', 4] in logit space), Q' = Q * max(1, num_patterns).

        With patterns, the content query of pattern i and anchor j is tgt_j + pattern_i and the
        anchors repeat once per pattern (pattern-major), as in the original.
        """
        content = self.tgt_embed.weight
        if self.denoising is not None:
            # indicator 0; + 0 x label_enc as the original, so that label_enc is used (DDP needs
            # every parameter in the graph) even when a batch has no ground truth to noise
            content = torch.cat([content, content.new_zeros(len(content), 1)], dim=1) + 0 * self.label_enc.weight[0, 0]
        anchors = self.refpoint_embed()
        if self.num_patterns > 0:
            patterns = self.patterns_embed.weight[:, None, :].repeat(1, content.shape[0], 1).flatten(0, 1)
            content = content.repeat(self.num_patterns, 1) + patterns
            anchors = anchors.repeat(self.num_patterns, 1)
        return content, anchors

    def multi_level_inputs(self, images: torch.Tensor, padding_mask: torch.Tensor):
        """Backbone and input projections.

        Returns three lists over levels (finest first): features [B, C, h, w], masks [B, h, w]
        (the image mask nearest-resized to each level, every level from the full-resolution
        mask as in the original) and image position embeddings [B, C, h, w].
        """
        features = self.backbone(images)
        srcs = [proj(features[f]) for proj, f in zip(self.input_proj, self.in_features)]
        last = features[self.in_features[-1]]
        for proj in self.input_proj[len(self.in_features):]:
            last = proj(last)
            srcs.append(last)
        masks = [F.interpolate(padding_mask[None].float(), size=s.shape[-2:])[0].to(torch.bool) for s in srcs]
        pos = [self.position_embedding(m).to(s.dtype) for m, s in zip(masks, srcs)]
        return srcs, masks, pos

    def predict(self, images: torch.Tensor, padding_mask: torch.Tensor, padded: bool = True,
                targets: Optional[List[Dict]] = None) -> Dict:
        """Run the network on a normalized, zero-padded batch.

        Args:
            images: [B, 3, H, W]; padding_mask: [B, H, W] bool, True on padded pixels.
            padded: unused (the deformable attention takes its valid ratios and value masking
                from ``padding_mask`` either way); accepted for the shared ``forward``.
            targets: in training with denoising, the ground truth to noise (see ``DABDETR.predict``).

        Returns:
            ``pred_logits`` [B, Q, C], ``pred_boxes`` [B, Q, 4] (normalized cx, cy, w, h) of the
            last layer; ``aux_outputs`` (earlier layers, first to last); for two-stage also
            ``enc_outputs`` (the selected encoder proposals, scored by the proposal class head);
            with denoising queries ``dn_outputs`` (``split_denoising_outputs``).
        """
        srcs, masks, pos = self.multi_level_inputs(images, padding_mask)
        dn = None
        if self.transformer.two_stage:
            num_layers = self.transformer.decoder.num_layers
            out = self.transformer(
                srcs, masks, pos, self.bbox_embed,
                proposal_class_embed=self.class_embed[num_layers], proposal_bbox_embed=self.bbox_embed[num_layers],
            )
        else:
            content, anchors = self.queries()
            if self.denoising is not None and self.training and targets is not None and self.denoising.groups > 0:
                dn = build_denoising_queries(targets, self.label_enc, self.denoising, self.num_classes, len(content))
                batch = images.shape[0]
                content = torch.cat([dn.content, content.expand(batch, -1, -1)], dim=1)
                anchors = torch.cat([dn.anchors_logit, anchors.expand(batch, -1, -1)], dim=1)
            out = self.transformer(srcs, masks, pos, self.bbox_embed, query_content=content, query_anchors=anchors,
                                   self_attn_mask=None if dn is None else dn.attn_mask)
        # the class heads in fp32 under bf16/fp16 autocast, as the box heads (dab_detr/precision.py)
        logits = torch.stack([run_in_fp32(head, h) for head, h in zip(self.class_embed, out["hs"])])
        boxes = out["boxes"]  # each layer's box head applied to its anchor, inside the decoder
        logits, boxes, dn_outputs = split_denoising_outputs(logits, boxes, dn)
        outputs = {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "aux_outputs": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])],
        }
        if self.transformer.two_stage:
            outputs["enc_outputs"] = {
                "pred_logits": run_in_fp32(self.class_embed[-1], out["enc_memory"]),
                "pred_boxes": out["enc_boxes"],
            }
        if dn_outputs is not None:
            outputs["dn_outputs"] = dn_outputs
        return outputs
