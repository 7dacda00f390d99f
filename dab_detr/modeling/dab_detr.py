"""DAB-DETR as a Detectron2 meta-architecture: the one adapter between Detectron2 and the core.

Only this module touches ``ImageList``, ``Instances`` and ``Boxes``; the transformer, matcher,
criterion and post-processing are plain torch.
"""
import logging
import math
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import box_convert

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import Boxes, ImageList, Instances

from ..precision import run_in_fp32
from .anchors import AnchorBoxes
from .box_ops import inverse_sigmoid
from .criterion import SetCriterion
from .denoising import build_denoising_queries, denoising_settings, matching_content, split_denoising_outputs
from .frozen_bn_folding import optimize_backbone
from .matcher import HungarianMatcher
from .mlp import MLP
from .position_encoding import PositionEmbeddingSine
from .postprocess import select_top_k
from .transformer import DABTransformer

logger = logging.getLogger(__name__)

__all__ = ["DABDETR", "SetPredictionDetector", "criterion_from_config"]


def criterion_from_config(c) -> SetCriterion:
    """The set loss from the yacs keys that ``dab_detr.config.add_set_loss_config`` adds."""
    matcher = HungarianMatcher(cost_class=c.COST_CLASS, cost_bbox=c.COST_BBOX, cost_giou=c.COST_GIOU,
                               alpha=c.FOCAL_ALPHA, gamma=c.FOCAL_GAMMA)
    return SetCriterion(
        matcher,
        weight_dict={"loss_class": c.CLASS_WEIGHT, "loss_bbox": c.BBOX_WEIGHT, "loss_giou": c.GIOU_WEIGHT},
        focal_alpha=c.FOCAL_ALPHA, focal_gamma=c.FOCAL_GAMMA,
    )


class SetPredictionDetector(nn.Module):
    """The Detectron2 side shared by DAB-DETR and DAB-Deformable-DETR.

    Batches and normalizes the images, builds the padding mask, calls the subclass's
    ``predict(images, padding_mask)``, then computes the losses (training) or builds
    ``Instances`` (inference). The constructor holds the state both detectors share; subclasses
    call it first, then build their own modules (registration order: backbone first, so that
    parameter order, and with it saved optimizer states, is unchanged).

    ``fast_backbone`` (default True) runs every conv + ``FrozenBatchNorm2d`` of the backbone as one
    convolution and keeps conv weights in ``channels_last`` (``optimize_backbone``); checkpoints
    and parameters are unchanged, outputs agree with ``fast_backbone=False`` to float rounding.
    """

    def __init__(self, *, backbone: Backbone, criterion: SetCriterion, num_classes: int, aux_loss: bool,
                 select_box_nums_for_evaluation: int, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 input_format: str, clip_boxes_to_image: bool = False, fast_backbone: bool = True):
        super().__init__()
        name = type(self).__name__
        if num_classes < 1:
            raise ValueError(f"{name}: num_classes must be >= 1, got {num_classes}")
        if len(pixel_mean) != len(pixel_std):
            raise ValueError(f"{name}: pixel_mean and pixel_std must have the same length")
        if fast_backbone:
            # frozen BN folded into the convs, NHWC conv weights (frozen_bn_folding.py): the same
            # function to ~1e-6 relative, same state_dict; fast_backbone=False is the plain path
            optimize_backbone(backbone, channels_last=True)
        self.backbone = backbone
        self.criterion = criterion
        self.num_classes = num_classes
        self.aux_loss = aux_loss
        self.select_box_nums_for_evaluation = select_box_nums_for_evaluation
        self.input_format = input_format
        self.clip_boxes_to_image = clip_boxes_to_image  # False: the original (boxes may leave the image)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        # diagnostics of the last training forward (e.g. class_error), detached device tensors
        self.training_metrics: Dict[str, torch.Tensor] = {}

    @staticmethod
    def init_heads(class_embed: nn.Linear, bbox_embed: MLP) -> None:
        """The original's head initialization: class prior 0.01, boxes start at the anchors."""
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess_image(batched_inputs)
        padding_mask = self.padding_mask(images)
        if self.training:
            # prepared first: query denoising feeds noised ground truth to the decoder
            targets = self.prepare_targets(batched_inputs, images)
            outputs = self.predict(images.tensor, padding_mask, padded=self.has_padding(images), targets=targets)
            if not self.aux_loss:
                outputs.pop("aux_outputs")
            losses, metrics = self.criterion(outputs, targets)
            # kept as device tensors: the training loop logs them where it reads the losses anyway
            # (reading them here would make a GPU wait in the middle of the step)
            self.training_metrics = {name: value.detach() for name, value in metrics.items()}
            return losses

        outputs = self.predict(images.tensor, padding_mask, padded=self.has_padding(images))
        scores, labels, boxes = select_top_k(
            outputs["pred_logits"], outputs["pred_boxes"], self.select_box_nums_for_evaluation
        )
        results = []
        for i, (input_per_image, image_size) in enumerate(zip(batched_inputs, images.image_sizes)):
            height = input_per_image.get("height", image_size[0])
            width = input_per_image.get("width", image_size[1])
            instances = Instances((height, width))
            # scaled by Python numbers: no host-to-device copy (which would synchronize on a GPU)
            scaled = boxes[i].clone()
            scaled[:, 0::2] *= width
            scaled[:, 1::2] *= height
            instances.pred_boxes = Boxes(scaled)
            if self.clip_boxes_to_image:  # as MMDetection's DAB-DETR post-processing
                instances.pred_boxes.clip((height, width))
            instances.scores = scores[i]
            instances.pred_classes = labels[i]
            results.append({"instances": instances})
        return results

    # ------------------------------------------------------------------ Detectron2 plumbing
    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalize and pad the images into one batch (zero padding at bottom and right)."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.backbone.size_divisibility,
                                      padding_constraints=self.backbone.padding_constraints)

    @staticmethod
    def padding_mask(images: ImageList) -> torch.Tensor:
        """[B, H, W] bool, True on the padding of each image."""
        batch, _, height, width = images.tensor.shape
        mask = torch.ones(batch, height, width, dtype=torch.bool, device=images.tensor.device)
        for i, (h, w) in enumerate(images.image_sizes):
            mask[i, :h, :w] = False
        return mask

    @staticmethod
    def has_padding(images: ImageList) -> bool:
        """Whether any image of the batch is padded (from the Python sizes: no device sync)."""
        height, width = images.tensor.shape[-2:]
        return any((h, w) != (height, width) for h, w in images.image_sizes)

    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        """Ground truth as normalized (cx, cy, w, h) boxes and 0-based labels.

        Boxes are clipped to the image; boxes that are empty after clipping (zero width or
        height, or entirely outside the image) are dropped with a warning, so they never reach
        the loss (where a zero-size box would make no sense). Non-finite coordinates and class
        ids outside [0, num_classes) raise a ``ValueError`` naming the image.

        The checks and the filtering run where the data loader put the ground truth (the CPU), and
        only the final targets are copied to the model's device: on a GPU, each check of a
        device tensor (``.all()``, ``.any()``) would wait for the device.
        """
        targets = []
        for x, (h, w) in zip(batched_inputs, images.image_sizes):
            name = x.get("file_name", x.get("image_id", "<unnamed image>"))
            if "instances" not in x:
                raise ValueError(f"{type(self).__name__}: training input {name} has no 'instances' (ground truth)")
            inst = x["instances"]
            boxes = inst.gt_boxes.tensor
            if not torch.isfinite(boxes).all():
                raise ValueError(f"{type(self).__name__}: image {name} has non-finite ground-truth box coordinates: {boxes.tolist()}")
            labels = inst.gt_classes
            bad = (labels < 0) | (labels >= self.num_classes)
            if bad.any():
                raise ValueError(
                    f"{type(self).__name__}: image {name} has class ids {labels[bad].tolist()} outside [0, {self.num_classes}); "
                    f"the model was built with num_classes={self.num_classes}"
                )
            boxes = Boxes(boxes.clone())
            boxes.clip((h, w))
            keep = boxes.nonempty(threshold=0.0)
            if not keep.all():
                logger.warning(
                    "%s: dropped %d empty ground-truth box(es) (zero size or outside the image) in %s",
                    type(self).__name__, int((~keep).sum()), name,
                )
            scale = boxes.tensor.new_tensor([w, h, w, h])
            targets.append({
                "labels": labels[keep].to(self.device),
                "boxes": box_convert(boxes.tensor[keep] / scale, "xyxy", "cxcywh").to(self.device),
            })
        return targets


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
            "backbone": build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))),
            "in_feature": c.IN_FEATURE,
            "position_embedding": position_embedding,
            "transformer": transformer,
            "criterion": criterion_from_config(c),
            "num_classes": c.NUM_CLASSES,
            "num_queries": c.NUM_QUERIES,
            "aux_loss": c.AUX_LOSS,
            "random_refpoints_xy": c.RANDOM_REFPOINTS_XY,
            "freeze_anchor_xy": c.FREEZE_ANCHOR_XY,
            "select_box_nums_for_evaluation": c.NUM_SELECT,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
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
