"""Data: the DETR dataset mapper, load-time checks, dataset registration, the resumable training
loader, 8-bit image reading and the demo dataset."""
from .dataset_checks import check_dataset_dicts, load_checked_dataset_dicts
from .detr_dataset_mapper import DetrDatasetMapper
from .image_reading import read_image_8bit
from .register import register_coco_detection
from .resumable_loader import build_resumable_train_loader

__all__ = ["DetrDatasetMapper", "build_resumable_train_loader", "check_dataset_dicts",
           "load_checked_dataset_dicts", "read_image_8bit", "register_coco_detection"]
