"""Dataset mapper for DETR-style training: Detectron2 dataset dict -> model input dict.

The augmentations are Detectron2's own (``detectron2.data.transforms``); this module only chooses
between the two training branches of the DETR recipe (SPEC.md section 8) and turns annotations into
``Instances``. Bad data is reported with the image file and the annotation (see
``dab_detr.data.dataset_checks`` for the load-time checks and the documented behaviour).
"""
import copy
import logging
from typing import List, Optional

import numpy as np
import torch

import detectron2.data.transforms as T
from detectron2.data import detection_utils as utils

from .dataset_checks import box_problem, describe_annotation
from .image_reading import read_image_8bit

__all__ = ["DetrDatasetMapper", "detr_train_augmentation", "detr_train_augmentation_with_crop",
           "detr_test_augmentation"]

logger = logging.getLogger(__name__)
_PROBLEM_TEXT = {"non-finite": "its box has a NaN or infinite coordinate",
                 "degenerate": "its box has zero or negative width/height",
                 "outside": "its box lies entirely outside the image"}


def detr_train_augmentation(min_sizes=tuple(range(480, 801, 32)), max_size=1333) -> List:
    """Branch 1 of the DETR recipe: horizontal flip, then multi-scale resize of the short side."""
    return [
        T.RandomFlip(),
        T.ResizeShortestEdge(short_edge_length=min_sizes, max_size=max_size, sample_style="choice"),
    ]


def detr_train_augmentation_with_crop(min_sizes=tuple(range(480, 801, 32)), max_size=1333,
                                      crop_resize_sizes=(400, 500, 600), crop_size=(384, 600)) -> List:
    """Branch 2: flip, resize to one of ``crop_resize_sizes``, random crop with each side in
    ``crop_size`` (absolute pixels), then the same multi-scale resize as branch 1."""
    return [
        T.RandomFlip(),
        T.ResizeShortestEdge(short_edge_length=crop_resize_sizes, sample_style="choice"),
        T.RandomCrop(crop_type="absolute_range", crop_size=crop_size),
        T.ResizeShortestEdge(short_edge_length=min_sizes, max_size=max_size, sample_style="choice"),
    ]


def detr_test_augmentation(min_size=800, max_size=1333) -> List:
    """Test-time resize: short side ``min_size``, long side at most ``max_size``."""
    return [T.ResizeShortestEdge(short_edge_length=min_size, max_size=max_size)]


class DetrDatasetMapper:
    """Read the image, apply the augmentation, and build the model input dict.

    Training picks, with probability 0.5 each, ``augmentation`` or ``augmentation_with_crop``
    (the two branches of the DETR recipe); at test time only ``augmentation`` is used and the
    annotations are dropped. Output: ``{"image": uint8 tensor [3, H, W] in ``image_format``,
    "height", "width" (original size), "image_id", "file_name", "instances": Instances(gt_boxes
    XYXY absolute in the augmented image, gt_classes)}`` (instances only in training).

    Bad data (documented in README "Custom data"):
      * an image that cannot be read: in training a warning naming the file, and the sample is
        skipped (``None``: Detectron2's ``MapDataset`` draws another image); at test time an error
        naming the file, since an evaluation must cover every image.
      * a 16-bit grayscale image is scaled to 8 bits (``read_image_8bit``).
      * a box with zero or negative width/height, a NaN/infinite coordinate, or entirely outside
        the image: the annotation is dropped with a warning naming the image file and the
        annotation (once per annotation).
      * crowd annotations are dropped (DETR does not use them).
    """

    def __init__(self, *, is_train: bool, augmentation: List,
                 augmentation_with_crop: Optional[List] = None, image_format: str = "RGB"):
        self.is_train = is_train
        self.augmentation = T.AugmentationList(augmentation)
        self.augmentation_with_crop = (
            T.AugmentationList(augmentation_with_crop) if augmentation_with_crop else None
        )
        self.image_format = image_format
        self._warned = set()
        logger.info("[DetrDatasetMapper] %s augmentation: %s; with crop: %s",
                    "train" if is_train else "test", augmentation, augmentation_with_crop)

    def _read_image(self, dataset_dict):
        file_name = dataset_dict["file_name"]
        try:
            image = read_image_8bit(file_name, format=self.image_format)  # 16-bit: scaled
            utils.check_image_size(dataset_dict, image)
        except Exception as e:  # missing file, undecodable bytes, size mismatch with the json
            message = (f"cannot use image file '{file_name}' (image_id {dataset_dict.get('image_id')}): "
                       f"{type(e).__name__}: {e}")
            if self.is_train:
                logger.warning("%s; skipping it in training.", message)
                return None
            raise RuntimeError(message) from e
        return image

    def _valid_annotations(self, dataset_dict):
        kept = []
        for index, anno in enumerate(dataset_dict.get("annotations", [])):
            if anno.get("iscrowd", 0) != 0:
                continue
            problem = box_problem(anno["bbox"], anno["bbox_mode"], dataset_dict.get("width"),
                                  dataset_dict.get("height"))
            if problem is not None:
                key = (dataset_dict["file_name"], index)
                if key not in self._warned:  # once per annotation, not once per epoch
                    self._warned.add(key)
                    logger.warning("dropping %s: %s.", describe_annotation(dataset_dict, index),
                                   _PROBLEM_TEXT[problem])
                continue
            kept.append(anno)
        return kept

    def __call__(self, dataset_dict):
        """dataset_dict: one image in Detectron2's dataset format. Returns the model input dict,
        or None (training only) when the image cannot be read."""
        dataset_dict = copy.deepcopy(dataset_dict)
        image = self._read_image(dataset_dict)
        if image is None:
            return None

        aug_input = T.AugInput(image)
        if self.is_train and self.augmentation_with_crop is not None and np.random.rand() > 0.5:
            transforms = self.augmentation_with_crop(aug_input)
        else:
            transforms = self.augmentation(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]  # h, w
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict

        annos = [
            utils.transform_instance_annotations(anno, transforms, image_shape)
            for anno in self._valid_annotations(dataset_dict)
        ]
        for anno in annos:  # boxes only: DAB-DETR has no mask or keypoint head
            anno.pop("segmentation", None)
            anno.pop("keypoints", None)
        instances = utils.annotations_to_instances(annos, image_shape)
        # boxes cropped away entirely have zero area now
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
        dataset_dict.pop("annotations", None)
        return dataset_dict
