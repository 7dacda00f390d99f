"""Detections written as a COCO results JSON, with the test dataset's image and category ids,
as ``COCOEvaluator`` writes them (``tools/predict.py --json``): a file that pycocotools'
``loadRes`` scores like ``--eval-only``."""
import json
import logging
import os

from detectron2.data import DatasetCatalog
from detectron2.evaluation.coco_evaluation import instances_to_coco_json

from .drawing import dataset_metadata

__all__ = ["CocoResults", "load_test_records"]

logger = logging.getLogger(__name__)


def load_test_records(cfg):
    """The records of the config's test dataset(s), [] for one that cannot be loaded (e.g. COCO not
    downloaded). Loading a registered COCO-format dataset also fills its metadata (class names,
    ``thing_dataset_id_to_contiguous_id``)."""
    names = cfg.dataloader.test.dataset.names
    records = []
    for name in [names] if isinstance(names, str) else list(names):
        try:
            records += DatasetCatalog.get(name)
        except Exception as e:
            logger.warning("dataset %s could not be loaded (%s: %s); image ids come from the file names",
                           name, type(e).__name__, e)
    return records


class CocoResults:
    """COCO results JSON of the detections, with the test dataset's image and category ids where
    it has them (as ``COCOEvaluator`` writes them). An image that is not in the dataset gets the
    number of its file name (COCO's 000000397133.jpg -> 397133), else the next free id."""

    def __init__(self, cfg, records):
        self.image_ids = {os.path.realpath(r["file_name"]): r["image_id"] for r in records}
        mapping = dataset_metadata(cfg).get("thing_dataset_id_to_contiguous_id", None)
        self.category_ids = {v: k for k, v in mapping.items()} if mapping else None
        self.results = []

    def image_id(self, path):
        key = os.path.realpath(path)
        if key not in self.image_ids:
            stem = os.path.splitext(os.path.basename(path))[0]
            numbers = [i for i in self.image_ids.values() if isinstance(i, int)]
            self.image_ids[key] = int(stem) if stem.isdigit() else max(numbers, default=0) + 1
        return self.image_ids[key]

    def add(self, path, instances):
        results = instances_to_coco_json(instances.to("cpu"), self.image_id(path))
        for result in results:
            if self.category_ids is not None:
                result["category_id"] = self.category_ids[result["category_id"]]
            result["file_name"] = path
        self.results += results

    def write(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.results, f)
