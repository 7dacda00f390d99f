"""COCO 2017 with the DETR augmentation (SPEC 8), on Detectron2's registered datasets.

Detectron2 finds COCO under $DETECTRON2_DATASETS (default ./datasets): coco/train2017,
coco/val2017, coco/annotations/instances_{train,val}2017.json.
"""
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from dab_detr.data.dataset_checks import load_checked_dataset_dicts
from dab_detr.data.detr_dataset_mapper import (
    DetrDatasetMapper,
    detr_test_augmentation,
    detr_train_augmentation,
    detr_train_augmentation_with_crop,
)

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    # filter_empty=False: the original trains on all 118,287 images (empty ones teach "no object")
    dataset=L(load_checked_dataset_dicts)(names="coco_2017_train", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=True,
        augmentation=L(detr_train_augmentation)(),
        augmentation_with_crop=L(detr_train_augmentation_with_crop)(),
        image_format="RGB",
    ),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(load_checked_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=False,
        augmentation=L(detr_test_augmentation)(min_size=800, max_size=1333),
        image_format="RGB",
    ),
    num_workers=4,
)

dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${...train.output_dir}",
)
