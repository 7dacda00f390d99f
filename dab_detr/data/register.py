"""Registering a user's COCO-format detection dataset."""
from typing import Dict, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json

from .dataset_checks import explain_load_error

__all__ = ["load_coco_detection_json", "register_coco_detection"]


def load_coco_detection_json(json_file: str, image_root: str, name: str):
    """``load_coco_json`` keeping annotation ids, with bad files explained: invalid JSON names the
    file, line and column; an undeclared category id names the annotation, image and file
    (ValueError instead of a bare JSONDecodeError / KeyError)."""
    try:
        return load_coco_json(json_file, image_root, name, extra_annotation_keys=["id"])
    except (KeyError, ValueError) as e:
        explained = explain_load_error(name, json_file, e)
        if explained is None:
            raise
        raise explained from e


def register_coco_detection(name: str, json_file: str, image_root: str, metadata: Optional[Dict] = None) -> str:
    """Detectron2's ``register_coco_instances``, keeping each annotation's ``id``.

    With the ids kept, the data checks name the offending annotation by its id in the JSON (plain
    ``register_coco_instances`` drops them, and a warning can only give the annotation's index).
    Bad annotation files are explained even when the dataset is read with a plain
    ``DatasetCatalog.get`` (as a config does to count the classes): see
    ``load_coco_detection_json``. Idempotent: a name that is already registered is left as it
    is. Returns ``name``.
    """
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(
            name, lambda: load_coco_detection_json(json_file, image_root, name)
        )
        MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco",
                                      **(metadata or {}))
    return name
