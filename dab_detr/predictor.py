"""Run a trained detector of a LazyConfig on images: Detectron2's ``DefaultPredictor`` for LazyConfigs.

``DefaultPredictor`` reads yacs configs only. ``Predictor`` builds ``cfg.model`` from a LazyConfig,
loads the weights through ``DABDETRCheckpointer`` (safe loading, torchvision/Detectron2 backbones,
a clear message for unconverted checkpoints), and prepares each image exactly as the config's
test data loader does (``dataloader.test.mapper``: its resize augmentations and its image format),
so that its detections are those of ``--eval-only``.

    predictor = Predictor("configs/dab_detr_demo.py", "output/dab_detr_demo/model_final.pth")
    instances = predictor(cv2.imread("photo.jpg"))["instances"]      # BGR numpy, as DefaultPredictor
    outputs = predictor(["a.jpg", PIL.Image.open("b.png")])           # one padded batch
"""
import logging
import os
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

import detectron2.data.transforms as T
from detectron2.config import LazyConfig, instantiate
from detectron2.data import detection_utils as utils

from .checkpoint import DABDETRCheckpointer
from .config_checks import ConfigError, apply_checked_overrides
from .data.image_reading import read_image_8bit
from .model_zoo import resolve_config_file
from .engine import ModelEMA, resolve_device
from .precision import resolve_precision
from .user_errors import InputFileError, file_problem

__all__ = ["Predictor", "ImageReadError", "load_lazy_config", "read_image_file"]

logger = logging.getLogger(__name__)

ImageLike = Union[np.ndarray, Image.Image, str, os.PathLike]


class ImageReadError(ValueError):
    """An input image file that does not exist or cannot be decoded (the message names it)."""


def load_lazy_config(config, overrides: Sequence[str] = ()):
    """A LazyConfig from a path (or an already loaded config, copied) with ``key=value`` overrides.

    A path that is not there but names a model-zoo config (``configs/dab_detr_r50.py`` outside the
    repository) is that config (``dab_detr.model_zoo``); an override of a key that does not exist
    is refused with the nearest names (``ConfigError``), as the training tool refuses it."""
    if isinstance(config, (str, os.PathLike)):
        try:
            path = resolve_config_file(os.fspath(config))
        except ConfigError as e:
            raise InputFileError(str(e)) from None
        cfg = LazyConfig.load(path)
    else:
        cfg = config.copy()  # never edit the caller's config
    return apply_checked_overrides(cfg, list(overrides))


def read_image_file(path, image_format: str = "RGB") -> np.ndarray:
    """An image file as an [H, W, 3] uint8 array in ``image_format`` ("RGB" or "BGR"), EXIF
    orientation applied, 16-bit grayscale scaled to 8 bits: the data mapper's reader
    (``read_image_8bit``), so a file gives the detections of ``--eval-only``.

    Raises ``ImageReadError`` naming the file when it is missing or not a readable image.
    """
    path = os.fspath(path)
    problem = file_problem(path)
    if problem:
        raise ImageReadError(f"image file {path} {problem}")
    try:
        return read_image_8bit(path, format=image_format)
    except Exception as e:  # PIL.UnidentifiedImageError, truncated files, ...
        raise ImageReadError(f"cannot read {path} as an image: {type(e).__name__}: {e}") from e


def _as_three_channels(array: np.ndarray, what: str) -> np.ndarray:
    """[H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (alpha last) -> [H, W, 3] uint8."""
    if array.dtype != np.uint8:
        raise ValueError(f"{what}: expected a uint8 image (0-255), got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(f"{what}: expected an image of shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], "
                         f"got {tuple(array.shape)}")
    if array.shape[2] == 1:  # grayscale
        return np.repeat(array, 3, axis=2)
    return array[:, :, :3]  # drop the alpha channel (as cv2.imread's default colour mode does)


class Predictor:
    """A detector of a LazyConfig, ready for inference on images.

    Args:
        config: a LazyConfig file path, or a loaded config (copied, not modified).
        checkpoint: the weights; defaults to the config's ``train.init_checkpoint``. A missing
            file, or no checkpoint at all, is an error (never a randomly initialized model).
        overrides: ``key=value`` config overrides, as on the command line.
        device: "cuda", "cpu", or None for CUDA when available, else CPU.
        precision: "fp32", "bf16", "fp16" (CUDA only) or "auto" (``dab_detr.precision``); None:
            the config's ``train.precision`` (fp32 when it has none).

    Calling it: ``predictor(image)`` with one image returns ``{"instances": Instances}``;
    ``predictor([image, ...])`` runs the images as one padded batch and returns one such dict per
    image. An image is a numpy array in BGR order (as ``DefaultPredictor``; pass
    ``array_format="RGB"`` for RGB arrays), a PIL image, or a file path; grayscale and RGBA
    images are turned into 3 channels (alpha dropped). ``Instances`` are on the model's device,
    in the input image's pixel coordinates: ``pred_boxes`` (absolute x0, y0, x1, y1),
    ``scores``, ``pred_classes`` (0-based contiguous ids), the model's top
    ``select_box_nums_for_evaluation`` detections (filter by score for display).

    With ``train.model_ema.enabled=True`` the checkpoint's EMA weights are used, as ``--eval-only``.
    """

    def __init__(self, config, checkpoint: Optional[str] = None, overrides: Sequence[str] = (),
                 device: Optional[str] = None, precision: Optional[str] = None):
        cfg = load_lazy_config(config, overrides)
        if checkpoint is None:
            checkpoint = cfg.get("train", {}).get("init_checkpoint", "")
        if not checkpoint:
            raise ValueError("Predictor needs trained weights: pass a checkpoint or set "
                             "train.init_checkpoint=/path/to/model.pth")
        problem = file_problem(checkpoint) if "://" not in str(checkpoint) else None
        if problem:
            raise InputFileError(f"checkpoint {checkpoint} {problem}")
        model = instantiate(cfg.model).to(resolve_device(device))
        extra = DABDETRCheckpointer(model).load(str(checkpoint))
        if cfg.get("train", {}).get("model_ema", {}).get("enabled", False) and "model_ema" in (extra or {}):
            ema = ModelEMA(model)
            ema.load_state_dict(extra["model_ema"])
            model.load_state_dict(ema.shadow, strict=False)
            logger.info("Predictor: using the EMA weights of %s", checkpoint)
        self._setup(cfg, model, precision)
        self.checkpoint = str(checkpoint)
        logger.info("Predictor: %s from %s on %s, precision %s", type(model).__name__, checkpoint,
                    self.device, self.precision)

    @classmethod
    def from_model(cls, cfg, model: torch.nn.Module, precision: Optional[str] = None) -> "Predictor":
        """A predictor around a model already in memory (e.g. just trained), on its device."""
        predictor = cls.__new__(cls)
        predictor._setup(cfg, model, precision)
        predictor.checkpoint = None
        return predictor

    def _setup(self, cfg, model, precision=None):
        self.cfg = cfg
        self.model = model.eval()
        where = "precision"
        if precision is None:
            precision, where = cfg.get("train", {}).get("precision", "fp32"), "train.precision"
        # the resolved setting: autocast dtype for the model's device (PrecisionError if unusable)
        self.precision = resolve_precision(precision, self.device, where)
        self.input_format = getattr(model, "input_format", "RGB")
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"Predictor supports models with input_format 'RGB' or 'BGR', "
                             f"got {self.input_format!r}")
        try:
            mapper = cfg.dataloader.test.mapper
            augmentation = mapper.augmentation
        except (AttributeError, KeyError) as e:
            raise ValueError("the config has no dataloader.test.mapper.augmentation: the predictor "
                             "applies the config's own test-time resize") from e
        mapper_format = mapper.get("image_format", "RGB")
        if mapper_format != self.input_format:
            raise ValueError(f"the config is inconsistent: dataloader.test.mapper.image_format is "
                             f"{mapper_format!r} but the model's input_format is {self.input_format!r}")
        self.augmentations = T.AugmentationList(list(instantiate(augmentation)))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ inputs
    def to_model_format(self, image: ImageLike, array_format: str = "BGR") -> np.ndarray:
        """One image -> [H, W, 3] uint8 array in the model's input format (before resizing)."""
        if isinstance(image, (str, os.PathLike)):
            return read_image_file(image, self.input_format)
        if isinstance(image, Image.Image):
            return utils.convert_PIL_to_numpy(image, self.input_format)  # .convert("RGB"): L, RGBA, P, ...
        if isinstance(image, np.ndarray):
            if array_format not in ("RGB", "BGR"):
                raise ValueError(f"array_format must be 'RGB' or 'BGR', got {array_format!r}")
            array = _as_three_channels(image, "Predictor input")
            return array if array_format == self.input_format else array[:, :, ::-1]
        raise TypeError(f"Predictor input must be a numpy array, a PIL image or a file path, "
                        f"got {type(image).__name__}")

    def prepare(self, images: Sequence[ImageLike], array_format: str = "BGR") -> List[Dict]:
        """Images -> the model's input dicts (``image`` resized by the test augmentation, [3, h, w]
        uint8; ``height``/``width``: the input size, in which the boxes are reported)."""
        inputs = []
        for image in images:
            array = self.to_model_format(image, array_format)
            height, width = array.shape[:2]
            aug_input = T.AugInput(array)
            self.augmentations(aug_input)
            tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
            inputs.append({"image": tensor, "height": height, "width": width})
        return inputs

    # ------------------------------------------------------------------ inference
    def __call__(self, images: Union[ImageLike, Sequence[ImageLike]], array_format: str = "BGR"):
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        if not batch:
            return []
        inputs = self.prepare(batch, array_format)
        with torch.no_grad(), self.precision.autocast():
            outputs = self.model(inputs)
        return outputs[0] if single else outputs
