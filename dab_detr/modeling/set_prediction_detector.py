"""The Detectron2 side shared by DAB-DETR and DAB-Deformable-DETR: the one adapter between
Detectron2 and the pure-torch core.

Only this module touches ``ImageList``, ``Instances`` and ``Boxes``; the transformer, matcher,
criterion and post-processing are plain torch. ``SetPredictionDetector`` batches the images,
builds the padding mask and the normalized targets, and turns the subclass's predictions into
losses (training) or ``Instances`` (inference).
"""
import logging
import math
from typing import Dict, List, Sequence

import torch
from torch import nn
from torchvision.ops import box_convert

from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone, build_backbone
from detectron2.structures import Boxes, ImageList, Instances

from .criterion import SetCriterion
from .frozen_bn_folding import optimize_backbone
from .matcher import HungarianMatcher
from .mlp import MLP
from .postprocess import select_top_k

logger = logging.getLogger(__name__)

__all__ = ["SetPredictionDetector", "criterion_from_config", "shared_from_config"]


def criterion_from_config(c) -> SetCriterion:
    """The set loss from the yacs keys of ``dab_detr.config.SHARED_KEYS``."""
    matcher = HungarianMatcher(cost_class=c.COST_CLASS, cost_bbox=c.COST_BBOX, cost_giou=c.COST_GIOU,
                               alpha=c.FOCAL_ALPHA, gamma=c.FOCAL_GAMMA)
    return SetCriterion(
        matcher,
        weight_dict={"loss_class": c.CLASS_WEIGHT, "loss_bbox": c.BBOX_WEIGHT, "loss_giou": c.GIOU_WEIGHT},
        focal_alpha=c.FOCAL_ALPHA, focal_gamma=c.FOCAL_GAMMA,
    )


def shared_from_config(cfg, c) -> dict:
    """The constructor arguments both detectors read from a yacs config (``c``: their node)."""
    return {
        "backbone": build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))),
        "criterion": criterion_from_config(c),
        "num_classes": c.NUM_CLASSES,
        "num_queries": c.NUM_QUERIES,
        "aux_loss": c.AUX_LOSS,
        "random_refpoints_xy": c.RANDOM_REFPOINTS_XY,
        "freeze_anchor_xy": c.FREEZE_ANCHOR_XY,
        "select_box_nums_for_evaluation": c.NUM_SELECT,
        "fast_backbone": c.FAST_BACKBONE,
        "pixel_mean": cfg.MODEL.PIXEL_MEAN,
        "pixel_std": cfg.MODEL.PIXEL_STD,
        "input_format": cfg.INPUT.FORMAT,
    }


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
