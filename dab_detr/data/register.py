"""Registering a user's COCO-format detection dataset."""
from typing import Dict, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json

__all__ = ["register_coco_detection"]


def register_coco_detection(name: str, json_file: str, image_root: str, metadata: Optional[Dict] = None) -> str:
    """Detectron2's ``register_coco_instances``, keeping each annotation's ``id``.

    With the ids kept, the data checks name the offending annotation by its id in the JSON (plain
    ``register_coco_instances`` drops them, and a warning can only give the annotation's index).
    Idempotent: a name that is already registered is left as it is. Returns ``name``.
    """
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(
            name, lambda: load_coco_json(json_file, image_root, name, extra_annotation_keys=["id"])
        )
        MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco",
                                      **(metadata or {}))
    return name
