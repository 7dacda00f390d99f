"""Drawing detections on an image with Detectron2's ``Visualizer`` (the one drawing path of the
project: ``tools/predict.py`` and ``tools/demo.py`` both draw through here)."""
import numpy as np

from detectron2.data import MetadataCatalog
from detectron2.structures import Instances
from detectron2.utils.visualizer import VisImage, Visualizer

__all__ = ["draw_detections", "dataset_metadata"]


def dataset_metadata(cfg):
    """Detectron2 metadata of the config's test dataset (``dataloader.test.dataset.names``; the
    first one when there are several), for the class names of the drawings."""
    names = cfg.dataloader.test.dataset.names
    name = names if isinstance(names, str) else list(names)[0]
    return MetadataCatalog.get(name)


def draw_detections(image_rgb: np.ndarray, instances: Instances, metadata, confidence_threshold: float,
                    scale: float = 1.0) -> VisImage:
    """Draw the detections scoring at least ``confidence_threshold`` on an image.

    Args:
        image_rgb: [H, W, 3] uint8 RGB image, the one the boxes' coordinates refer to.
        instances: a predictor's ``Instances`` (``pred_boxes``, ``scores``, ``pred_classes``), any device.
        metadata: Detectron2 metadata whose ``thing_classes`` name the classes.
        scale: output size relative to the image.

    Returns:
        Detectron2's ``VisImage`` (``.save(path)``, ``.get_image()`` -> RGB uint8 array).
    """
    instances = instances.to("cpu")
    instances = instances[instances.scores >= confidence_threshold]
    return Visualizer(image_rgb, metadata, scale=scale).draw_instance_predictions(instances)
