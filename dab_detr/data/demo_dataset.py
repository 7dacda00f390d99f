"""A small synthetic detection dataset for the CPU demo, generated deterministically on first use.

Each image shows a few objects of 4 classes (rectangle, ellipse, triangle, cross) whose sizes span
a factor of 7 (16 to 112 px on a ~160 px image) and whose aspect ratios range from 1:4
to 4:1, on a cluttered background (smooth colour noise, grey strokes and grey blobs that are not
objects). Widely varying box widths and heights are what DAB-DETR's width/height-modulated
cross-attention is for. Class is shape; each class also has its own hue range (jittered), so that a
small model trained from scratch on 2 CPU cores learns it in minutes.

Layout under ``$DETECTRON2_DATASETS`` (default ``./datasets``)::

    dab_demo/train/000000.png ...   dab_demo/val/000000.png ...
    dab_demo/annotations/train.json, val.json   (COCO format, category ids 1..4, annotation ids)
    dab_demo/manifest.json          (written last: version, counts, file sizes)

The data is regenerated when the manifest is missing, from another version, or any file is missing
or has another size than recorded. Registered Detectron2 datasets: ``dab_demo_train``,
``dab_demo_val`` (evaluator_type "coco").
"""
import json
import logging
import os
import shutil
import uuid
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json

__all__ = ["DEMO_CLASSES", "demo_dataset_root", "ensure_demo_dataset", "register_demo_dataset",
           "render_demo_image"]

logger = logging.getLogger(__name__)

DEMO_CLASSES = ["rectangle", "ellipse", "triangle", "cross"]
# hue centre (degrees) per class; objects get hue +- 20, saturation 0.6..1, value 0.6..1
_CLASS_HUES = [0.0, 120.0, 230.0, 50.0]
_VERSION = 2
_SPLITS = {"train": (1600, 1), "val": (200, 2)}  # name: (number of images, seed)
_IMAGE_SIZES = [(160, 160), (192, 160), (160, 192), (176, 144), (144, 176)]  # (width, height)
_MIN_SIDE, _MAX_SIDE = 16.0, 112.0  # object size sqrt(w*h) in px, log-uniform (7x range)
_MAX_ASPECT = 4.0  # w/h log-uniform in [1/4, 4]
_NUM_OBJECTS = (1, 6)  # objects per image, uniform (fewer when they do not fit)


def demo_dataset_root() -> str:
    """``$DETECTRON2_DATASETS/dab_demo`` (``./datasets/dab_demo`` by default)."""
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "dab_demo")


def _hsv_to_rgb(h: float, s: float, v: float) -> Tuple[int, int, int]:
    c = v * s
    x = c * (1 - abs((h / 60.0) % 2 - 1))
    m = v - c
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h // 60) % 6]
    return tuple(int(round(255 * (u + m))) for u in (r, g, b))


def _background(rng: np.random.RandomState, width: int, height: int) -> Image.Image:
    """Smooth low-saturation colour noise with grey strokes and blobs (clutter, not objects)."""
    coarse = rng.uniform(60, 190, size=(4 + height // 24, 4 + width // 24, 1))
    tint = rng.uniform(-20, 20, size=(1, 1, 3))
    coarse = np.clip(coarse + tint + rng.normal(0, 8, size=coarse.shape[:2] + (3,)), 0, 255)
    image = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(6, 14)):  # strokes
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        x1, y1 = x0 + rng.normal(0, width / 3), y0 + rng.normal(0, height / 3)
        gray = int(rng.uniform(40, 220))
        draw.line([x0, y0, x1, y1], fill=(gray, gray, gray), width=int(rng.randint(1, 4)))
    for _ in range(rng.randint(3, 8)):  # blobs
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(2, 14)
        gray = int(rng.uniform(40, 220))
        draw.ellipse([cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r], fill=(gray,) * 3)
    noise = rng.normal(0, 6, size=(height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def _draw_object(draw: ImageDraw.ImageDraw, category: int, box: List[float], color) -> None:
    x0, y0, x1, y1 = box
    if category == 0:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=color)
    elif category == 1:
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=color)
    elif category == 2:
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=color)
    else:
        w, h = x1 - x0, y1 - y0
        draw.rectangle([x0, y0 + h / 3, x1 - 1, y0 + 2 * h / 3 - 1], fill=color)
        draw.rectangle([x0 + w / 3, y0, x0 + 2 * w / 3 - 1, y1 - 1], fill=color)


def _overlap_fraction(a: List[float], b: List[float]) -> float:
    """Intersection area over the smaller box's area (boxes xyxy)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def render_demo_image(seed: int) -> Tuple[Image.Image, List[Dict]]:
    """Render one image. Returns (RGB image, objects as dicts {"category": 0..3, "box": xyxy int})."""
    rng = np.random.RandomState(seed)
    width, height = _IMAGE_SIZES[rng.randint(len(_IMAGE_SIZES))]
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    objects: List[Dict] = []
    for _ in range(rng.randint(_NUM_OBJECTS[0], _NUM_OBJECTS[1] + 1)):
        for _attempt in range(20):
            side = np.exp(rng.uniform(np.log(_MIN_SIDE), np.log(_MAX_SIDE)))
            aspect = np.exp(rng.uniform(-np.log(_MAX_ASPECT), np.log(_MAX_ASPECT)))
            w = int(round(min(side * np.sqrt(aspect), width - 2)))
            h = int(round(min(side / np.sqrt(aspect), height - 2)))
            w, h = max(w, 4), max(h, 4)
            x0 = rng.randint(0, width - w + 1)
            y0 = rng.randint(0, height - h + 1)
            box = [x0, y0, x0 + w, y0 + h]
            if all(_overlap_fraction(box, o["box"]) < 0.15 for o in objects):
                break
        else:
            continue
        category = int(rng.randint(len(DEMO_CLASSES)))
        hue = (_CLASS_HUES[category] + rng.uniform(-20, 20)) % 360
        color = _hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
        _draw_object(draw, category, box, color)
        objects.append({"category": category, "box": box})
    return image, objects


def _generate(root: str) -> Dict:
    """Write all splits under ``root``; returns the manifest (file sizes per split)."""
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    manifest = {"version": _VERSION, "files": {}}
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                  for i, name in enumerate(DEMO_CLASSES)]
    for split, (count, base_seed) in _SPLITS.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            image, objects = render_demo_image(base_seed * 1_000_000 + index)
            file_name = f"{index:06d}.png"
            path = os.path.join(root, split, file_name)
            image.save(path)
            manifest["files"][f"{split}/{file_name}"] = os.path.getsize(path)
            images.append({"id": index + 1, "file_name": file_name,
                           "width": image.width, "height": image.height})
            for obj in objects:
                x0, y0, x1, y1 = obj["box"]
                annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                    "category_id": obj["category"] + 1,
                                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                                    "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        json_path = os.path.join(root, "annotations", f"{split}.json")
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
        manifest["files"][f"annotations/{split}.json"] = os.path.getsize(json_path)
    with open(os.path.join(root, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    return manifest


def _is_complete(root: str) -> bool:
    try:
        with open(os.path.join(root, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("version") != _VERSION:
            return False
        for rel, size in manifest["files"].items():
            if os.path.getsize(os.path.join(root, rel)) != size:
                return False
        for split in _SPLITS:
            with open(os.path.join(root, "annotations", f"{split}.json"), encoding="utf-8") as f:
                json.load(f)
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_demo_dataset(root: str = None) -> str:
    """Generate the dataset under ``root`` (default: demo_dataset_root()) unless a complete copy
    of this version is there. Safe when several processes call it at once (each writes to its own
    temporary folder, the first rename wins). Returns root."""
    root = root or demo_dataset_root()
    if _is_complete(root):
        return root
    logger.info("Generating the DAB-DETR demo dataset under %s ...", root)
    tmp = f"{root}.tmp-{uuid.uuid4().hex[:8]}"
    _generate(tmp)
    if os.path.exists(root) and not _is_complete(root):
        shutil.rmtree(root, ignore_errors=True)  # missing, corrupt or older version
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    if not _is_complete(root):
        raise RuntimeError(f"could not generate the demo dataset under {root}")
    return root


def _load_split(root: str, split: str, name: str) -> List[Dict]:
    ensure_demo_dataset(root)
    return load_coco_json(os.path.join(root, "annotations", f"{split}.json"),
                          os.path.join(root, split), name, extra_annotation_keys=["id"])


def register_demo_dataset(root: str = None, prefix: str = "dab_demo") -> List[str]:
    """Register ``{prefix}_train`` and ``{prefix}_val`` (idempotent). The data is generated the
    first time a split is loaded. Returns the two names."""
    root = root or demo_dataset_root()
    names = []
    for split in _SPLITS:
        name = f"{prefix}_{split}"
        names.append(name)
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda r=root, s=split, n=name: _load_split(r, s, n))
        MetadataCatalog.get(name).set(
            json_file=os.path.join(root, "annotations", f"{split}.json"),
            image_root=os.path.join(root, split), evaluator_type="coco",
            thing_classes=list(DEMO_CLASSES))
    return names
