"""Data: the DETR dataset mapper, load-time checks, dataset registration and the demo dataset."""
from .dataset_checks import check_dataset_dicts, load_checked_dataset_dicts
from .detr_dataset_mapper import DetrDatasetMapper
from .register import register_coco_detection

__all__ = ["DetrDatasetMapper", "check_dataset_dicts", "load_checked_dataset_dicts", "register_coco_detection"]
