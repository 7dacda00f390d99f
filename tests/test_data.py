"""Data pipeline: DetrDatasetMapper outputs, the bad-data behaviour table of
``dab_detr.data.dataset_checks`` (asserting on the messages), and the demo dataset generator.

Also home of ``write_coco_dataset`` / ``register_tiny_coco``, the tiny COCO-format datasets used by
the training tests (imported from here as ``from test_data import ...``).
"""
import json
import logging
import os
import uuid

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import detectron2.data.transforms as T
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances
from detectron2.structures import BoxMode

from dab_detr.data.register import register_coco_detection
from dab_detr.data import demo_dataset
from dab_detr.data.dataset_checks import check_dataset_dicts, load_checked_dataset_dicts
from dab_detr.data.detr_dataset_mapper import DetrDatasetMapper

CLASSES = ["square", "bar", "dot"]
# class colours (RGB) of the drawn objects; the background is dark grey
COLORS = [(230, 40, 40), (40, 230, 40), (40, 40, 230)]

# one entry per image: list of (category_id in the json, [x, y, w, h]); ids 1..3
DEFAULT_IMAGES = [
    [(1, [8, 8, 20, 20])],
    [(2, [4, 30, 40, 10]), (3, [40, 6, 12, 12])],
    [(1, [30, 30, 24, 24]), (2, [6, 6, 30, 8]), (3, [10, 44, 10, 10])],
    [(3, [24, 20, 16, 16])],
]


def write_coco_dataset(root, images=DEFAULT_IMAGES, *, size=(64, 64), classes=CLASSES, seed=0,
                       extra_annotations=()):
    """Write PNG images drawn with PIL and a COCO json under ``root``.

    images: per image a list of (category_id, [x, y, w, h]); category ids are 1..len(classes).
    extra_annotations: raw annotation dicts appended as they are (for bad-data cases).
    Returns (json_path, image_root).
    """
    image_root = os.path.join(str(root), "images")
    os.makedirs(image_root, exist_ok=True)
    rng = np.random.RandomState(seed)
    width, height = size
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(classes)]}
    for index, objects in enumerate(images):
        pixels = rng.randint(40, 80, size=(height, width, 3)).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        file_name = f"{index:04d}.png"
        for category, (x, y, w, h) in objects:
            if w > 0 and h > 0:
                draw.rectangle([x, y, x + w - 1, y + h - 1], fill=COLORS[(category - 1) % len(COLORS)])
            coco["annotations"].append({
                "id": 100 + len(coco["annotations"]), "image_id": index + 1, "category_id": category,
                "bbox": [x, y, w, h], "area": max(w, 0) * max(h, 0), "iscrowd": 0})
        image.save(os.path.join(image_root, file_name))
        coco["images"].append({"id": index + 1, "file_name": file_name, "width": width, "height": height})
    coco["annotations"].extend(extra_annotations)
    json_path = os.path.join(str(root), "annotations.json")
    with open(json_path, "w") as f:
        json.dump(coco, f)
    return json_path, image_root


def register_tiny_coco(json_path, image_root, prefix="tiny"):
    """register_coco_instances under a fresh unique name (the catalogs are process-global)."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, json_path, image_root)
    return name


def test_helper_dataset_loads(tmp_path):
    json_path, image_root = write_coco_dataset(tmp_path)
    name = register_tiny_coco(json_path, image_root)
    dicts = load_checked_dataset_dicts(name)
    assert [len(d["annotations"]) for d in dicts] == [1, 2, 3, 1]
    assert MetadataCatalog.get(name).thing_classes == CLASSES


# ------------------------------------------------------------------ DetrDatasetMapper
def _record(tmp_path):
    json_path, image_root = write_coco_dataset(tmp_path)
    # with a dataset name, load_coco_json maps the json ids 1..3 to contiguous 0..2
    return load_coco_json(json_path, image_root, f"rec_{uuid.uuid4().hex[:8]}", extra_annotation_keys=["id"])


def test_mapper_train_output_rgb_uint8_and_boxes_follow_augmentation(tmp_path):
    record = _record(tmp_path)[2]  # 3 boxes, 64x64
    mapper = DetrDatasetMapper(is_train=True, image_format="RGB", augmentation=[
        T.RandomFlip(prob=1.0), T.ResizeShortestEdge(short_edge_length=96, max_size=200)])
    out = mapper(record)
    image = out["image"]
    assert image.dtype == torch.uint8 and image.shape == (3, 96, 96)
    assert (out["height"], out["width"]) == (64, 64)  # original size, for evaluation
    boxes = out["instances"].gt_boxes.tensor
    # flipped horizontally, then scaled by 1.5: x' = (64 - x - w) * 1.5
    expected = torch.tensor([[(64 - x - w) * 1.5, y * 1.5, (64 - x) * 1.5, (y + h) * 1.5]
                             for _, (x, y, w, h) in DEFAULT_IMAGES[2]])
    torch.testing.assert_close(boxes, expected)
    assert out["instances"].gt_classes.tolist() == [0, 1, 2]  # contiguous ids
    # RGB: the red square (category 1 at x 30..53, y 30..53 before flipping) is red in channel 0
    cx, cy = int((64 - 42) * 1.5), int(42 * 1.5)
    pixel = image[:, cy, cx].tolist()
    assert pixel[0] > 200 and pixel[1] < 80 and pixel[2] < 80, pixel
    assert "annotations" not in out


def test_mapper_test_mode_drops_annotations_and_keeps_size(tmp_path):
    record = _record(tmp_path)[1]
    mapper = DetrDatasetMapper(is_train=False, augmentation=[T.ResizeShortestEdge(80, max_size=200)])
    out = mapper(record)
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 80, 80)
    assert "instances" not in out and "annotations" not in out
    assert (out["height"], out["width"], out["image_id"]) == (64, 64, 2)


def test_mapper_crop_branch_boxes_inside_image(tmp_path):
    record = _record(tmp_path)[2]
    mapper = DetrDatasetMapper(
        is_train=True, augmentation=[T.ResizeShortestEdge(64, max_size=200)],
        augmentation_with_crop=[T.RandomCrop(crop_type="absolute_range", crop_size=(32, 48)),
                                T.ResizeShortestEdge(64, max_size=200)])
    np.random.seed(0)
    for _ in range(6):  # both branches are drawn
        out = mapper(record)
        h, w = out["image"].shape[1:]
        boxes = out["instances"].gt_boxes.tensor
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


# ------------------------------------------------------------------ bad data (table of dataset_checks)
@pytest.fixture
def warnings_of(caplog):
    caplog.set_level(logging.WARNING, logger="dab_detr")
    return caplog


def test_missing_image_file_stops_naming_the_file(tmp_path):
    json_path, image_root = write_coco_dataset(tmp_path)
    os.remove(os.path.join(image_root, "0002.png"))
    name = register_tiny_coco(json_path, image_root)
    with pytest.raises(FileNotFoundError) as error:
        load_checked_dataset_dicts(name)
    assert "0002.png" in str(error.value) and "1 of 4" in str(error.value)
    assert "0001.png" not in str(error.value)


def test_missing_image_at_test_time_in_mapper_names_the_file(tmp_path):
    record = _record(tmp_path)[0]
    record["file_name"] = str(tmp_path / "gone.png")
    mapper = DetrDatasetMapper(is_train=False, augmentation=[])
    with pytest.raises(RuntimeError, match="gone.png"):
        mapper(record)


def test_corrupt_image_training_skipped_with_warning_test_stops(tmp_path, warnings_of):
    json_path, image_root = write_coco_dataset(tmp_path)
    bad = os.path.join(image_root, "0001.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not an image")
    name = register_tiny_coco(json_path, image_root)
    dicts = load_checked_dataset_dicts(name)  # the file exists: not a load-time error
    record = next(d for d in dicts if d["file_name"] == bad)

    train_mapper = DetrDatasetMapper(is_train=True, augmentation=[])
    assert train_mapper(record) is None  # MapDataset draws another image
    assert any("0001.png" in r.getMessage() and "skipping" in r.getMessage()
               for r in warnings_of.records if r.levelno == logging.WARNING), warnings_of.text
    assert train_mapper(dicts[0]) is not None  # good images still work

    test_mapper = DetrDatasetMapper(is_train=False, augmentation=[])
    with pytest.raises(RuntimeError, match="0001.png"):
        test_mapper(record)


def test_degenerate_box_dropped_with_warning_naming_image_and_annotation(tmp_path, warnings_of):
    images = [[(1, [8, 8, 20, 20]), (2, [10, 10, 0, 12]), (3, [5, 5, 6, -3])],
              [(2, [4, 30, 40, 10])]]
    json_path, image_root = write_coco_dataset(tmp_path, images)
    # registered with register_coco_detection, which keeps the annotation ids: the message names them
    name = register_coco_detection(f"tiny_ids_{uuid.uuid4().hex[:8]}", json_path, image_root)
    assert register_coco_detection(name, json_path, image_root) == name  # idempotent
    dicts = load_checked_dataset_dicts(name)
    assert [len(d["annotations"]) for d in dicts] == [1, 1]
    assert dicts[0]["annotations"][0]["bbox"] == [8, 8, 20, 20]
    text = "\n".join(r.getMessage() for r in warnings_of.records)
    assert "dropped 2 annotations" in text
    assert "annotation id 101" in text and "annotation id 102" in text and "0000.png" in text
    assert "annotation id 100 " not in text

    # the same data through the plain register_coco_instances (no ids): index + bbox + image
    warnings_of.clear()
    plain = register_tiny_coco(json_path, image_root)
    load_checked_dataset_dicts(plain)
    text = "\n".join(r.getMessage() for r in warnings_of.records)
    assert "index 1, bbox [10, 10, 0, 12]" in text and "0000.png" in text

    # and in the mapper (datasets that bypass load_checked_dataset_dicts)
    warnings_of.clear()
    raw = load_coco_json(json_path, image_root, f"raw_{uuid.uuid4().hex[:8]}", extra_annotation_keys=["id"])
    out = DetrDatasetMapper(is_train=True, augmentation=[])(raw[0])
    assert len(out["instances"]) == 1
    text = "\n".join(r.getMessage() for r in warnings_of.records)
    assert "annotation id 101" in text and "0000.png" in text


def test_image_without_annotations_skipped_in_training_kept_in_evaluation(tmp_path, warnings_of):
    images = [[(1, [8, 8, 20, 20])], [], [(2, [1, 1, 0, 0])], [(3, [24, 20, 16, 16])]]
    json_path, image_root = write_coco_dataset(tmp_path, images)
    name = register_tiny_coco(json_path, image_root)
    train = load_checked_dataset_dicts(name, filter_empty=True)
    assert [os.path.basename(d["file_name"]) for d in train] == ["0000.png", "0003.png"]
    text = "\n".join(r.getMessage() for r in warnings_of.records)
    assert "skipping 2 of 4 images" in text and "0001.png" in text and "0002.png" in text
    evaluation = load_checked_dataset_dicts(name, filter_empty=False)
    assert len(evaluation) == 4

    all_empty = register_tiny_coco(*write_coco_dataset(tmp_path / "empty", [[], []]))
    with pytest.raises(ValueError, match="no image with a usable annotation"):
        load_checked_dataset_dicts(all_empty, filter_empty=True)


def test_unknown_category_id_in_json_stops_naming_annotation_image_and_valid_ids(tmp_path):
    bad = {"id": 777, "image_id": 2, "category_id": 9, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}
    json_path, image_root = write_coco_dataset(tmp_path, extra_annotations=[bad])
    name = register_tiny_coco(json_path, image_root)
    with pytest.raises(ValueError) as error:
        load_checked_dataset_dicts(name)
    message = str(error.value)
    assert "annotation id 777" in message and "category_id 9" in message
    assert "0001.png" in message and "[1, 2, 3]" in message


def test_category_out_of_range_in_dataset_dicts_stops():
    record = {"file_name": "x.png", "image_id": 5, "annotations": [
        {"id": 3, "bbox": [0, 0, 4, 4], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 3}]}
    with pytest.raises(ValueError) as error:
        check_dataset_dicts([record], "mine", num_classes=3, check_files=False)
    assert "annotation id 3" in str(error.value) and "x.png" in str(error.value)
    assert "0..2" in str(error.value)


# ------------------------------------------------------------------ demo dataset
def test_demo_image_rendering_is_deterministic():
    a, objects_a = demo_dataset.render_demo_image(1234)
    b, objects_b = demo_dataset.render_demo_image(1234)
    c, _ = demo_dataset.render_demo_image(1235)
    assert a.tobytes() == b.tobytes() and objects_a == objects_b
    assert a.tobytes() != c.tobytes()
    assert 1 <= len(objects_a) <= 6
    for obj in objects_a:
        x0, y0, x1, y1 = obj["box"]
        assert 0 <= x0 < x1 <= a.width and 0 <= y0 < y1 <= a.height


def test_demo_dataset_regenerated_when_a_file_is_missing_or_corrupt(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_dataset, "_SPLITS", {"train": (3, 1), "val": (2, 2)})
    root = str(tmp_path / "dab_demo")
    demo_dataset.ensure_demo_dataset(root)
    path = os.path.join(root, "train", "000001.png")
    original = open(path, "rb").read()
    assert sorted(os.listdir(os.path.join(root, "train"))) == ["000000.png", "000001.png", "000002.png"]
    with open(os.path.join(root, "annotations", "val.json")) as f:
        assert len(json.load(f)["images"]) == 2

    # complete: not regenerated (the file object stays the same)
    mtime = os.stat(path).st_mtime_ns
    demo_dataset.ensure_demo_dataset(root)
    assert os.stat(path).st_mtime_ns == mtime

    os.remove(path)
    demo_dataset.ensure_demo_dataset(root)
    assert open(path, "rb").read() == original  # same seed -> identical bytes

    with open(path, "wb") as f:
        f.write(original[: len(original) // 2])  # truncated
    demo_dataset.ensure_demo_dataset(root)
    assert open(path, "rb").read() == original

    with open(os.path.join(root, "annotations", "train.json"), "w") as f:
        f.write("{not json")
    demo_dataset.ensure_demo_dataset(root)
    with open(os.path.join(root, "annotations", "train.json")) as f:
        assert len(json.load(f)["images"]) == 3
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no temporary folders left


def test_demo_dataset_registration_loads_coco_dicts(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_dataset, "_SPLITS", {"train": (2, 1), "val": (1, 2)})
    prefix = f"demo_{uuid.uuid4().hex[:6]}"
    names = demo_dataset.register_demo_dataset(str(tmp_path / "d"), prefix=prefix)
    assert names == [f"{prefix}_train", f"{prefix}_val"]
    dicts = load_checked_dataset_dicts(names[0])
    assert len(dicts) == 2 and all("id" in a for d in dicts for a in d["annotations"])
    assert MetadataCatalog.get(names[0]).thing_classes == demo_dataset.DEMO_CLASSES


# ------------------------------------------------------------------ bad data: files and boxes (issue 14)
def test_invalid_json_stops_naming_the_file_and_position(tmp_path):
    json_path, image_root = write_coco_dataset(tmp_path)
    text = open(json_path).read()
    with open(json_path, "w") as f:
        f.write(text.replace('"annotations":', '"annotations" oops:', 1))  # json.dump: one line
    # the README's way: register_coco_detection, then a plain DatasetCatalog.get in the config
    name = register_coco_detection(f"badjson_{uuid.uuid4().hex[:8]}", json_path, image_root)
    with pytest.raises(ValueError) as error:
        DatasetCatalog.get(name)
    message = str(error.value)
    assert json_path in message and "not valid JSON" in message
    assert "line 1, column " in message and "(character " in message
    # and through load_checked_dataset_dicts with Detectron2's own register_coco_instances
    plain = register_tiny_coco(json_path, image_root)
    with pytest.raises(ValueError) as error:
        load_checked_dataset_dicts(plain)
    assert json_path in str(error.value) and "line 1, column " in str(error.value)


def test_undeclared_category_through_plain_catalog_get_names_annotation_image_and_file(tmp_path):
    """README "Custom data" calls DatasetCatalog.get to count the classes: the error must already
    be the explained one there, not Detectron2's KeyError."""
    bad = {"id": 777, "image_id": 2, "category_id": 9, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}
    json_path, image_root = write_coco_dataset(tmp_path, extra_annotations=[bad])
    name = register_coco_detection(f"badcat_{uuid.uuid4().hex[:8]}", json_path, image_root)
    with pytest.raises(ValueError) as error:
        DatasetCatalog.get(name)
    message = str(error.value)
    assert "annotation id 777" in message and "category_id 9" in message and "0001.png" in message
    assert json_path in message and "valid ids: [1, 2, 3]" in message


def test_box_outside_the_image_or_nan_is_dropped_with_a_warning_naming_it(tmp_path, warnings_of):
    images = [[(1, [8, 8, 20, 20]), (2, [70, 10, 10, 10]), (3, [10, -30, 8, 8]),
               (1, [float("nan"), 5, 10, 10]), (2, [50, 50, 30, 30])],  # the last: partly outside
              [(2, [4, 30, 40, 10])]]
    json_path, image_root = write_coco_dataset(tmp_path, images)  # 64 x 64 images
    name = register_coco_detection(f"outside_{uuid.uuid4().hex[:8]}", json_path, image_root)
    dicts = load_checked_dataset_dicts(name)
    assert [a["bbox"] for a in dicts[0]["annotations"]] == [[8, 8, 20, 20], [50, 50, 30, 30]]
    text = "\n".join(r.getMessage() for r in warnings_of.records)
    assert "dropped 2 annotations whose box lies entirely outside its image" in text
    assert "annotation id 101" in text and "annotation id 102" in text and "0000.png" in text
    assert "dropped 1 annotations whose box has a NaN or infinite coordinate" in text
    assert "annotation id 103" in text

    # the mapper (datasets that bypass load_checked_dataset_dicts) warns too; the partly outside
    # box is clipped to the image
    warnings_of.clear()
    raw = load_coco_json(json_path, image_root, f"raw_{uuid.uuid4().hex[:8]}", extra_annotation_keys=["id"])
    out = DetrDatasetMapper(is_train=True, augmentation=[])(raw[0])
    boxes = out["instances"].gt_boxes.tensor.tolist()
    assert boxes == [[8, 8, 28, 28], [50, 50, 64, 64]]
    text = "\n".join(r.getMessage() for r in warnings_of.records)
    assert "annotation id 101" in text and "annotation id 102" in text and "lies entirely outside" in text
    assert "annotation id 103" in text and "NaN or infinite" in text


def test_16_bit_png_is_read_scaled_to_8_bits(tmp_path):
    json_path, image_root = write_coco_dataset(tmp_path, [[(1, [8, 8, 20, 20])]])
    values = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    path = os.path.join(image_root, "0000.png")
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # really 16 bits per pixel
    record = load_coco_json(json_path, image_root, f"u16_{uuid.uuid4().hex[:8]}")[0]
    out = DetrDatasetMapper(is_train=False, augmentation=[])(record)
    expected = torch.from_numpy(np.round(values / 257.0).astype(np.uint8))
    assert out["image"].shape == (3, 64, 64)
    for channel in range(3):
        torch.testing.assert_close(out["image"][channel], expected, atol=0, rtol=0)
    assert out["image"].float().std() > 50  # not the all-white image PIL's convert gives


def test_image_with_values_beyond_16_bits_is_refused_naming_the_file(tmp_path):
    json_path, image_root = write_coco_dataset(tmp_path, [[(1, [8, 8, 20, 20])]])
    path = os.path.join(image_root, "0000.tif")
    Image.fromarray(np.full((64, 64), 100000, np.int32)).save(path)
    record = load_coco_json(json_path, image_root, f"i32_{uuid.uuid4().hex[:8]}")[0]
    record["file_name"] = path
    with pytest.raises(RuntimeError, match=r"0000\.tif.*outside 0\.\.65535"):
        DetrDatasetMapper(is_train=False, augmentation=[])(record)


def test_crowd_annotations_are_dropped(tmp_path):
    crowd = {"id": 900, "image_id": 1, "category_id": 2, "bbox": [30, 30, 20, 20], "area": 400, "iscrowd": 1}
    json_path, image_root = write_coco_dataset(tmp_path, [[(1, [8, 8, 20, 20])]], extra_annotations=[crowd])
    record = load_coco_json(json_path, image_root, f"crowd_{uuid.uuid4().hex[:8]}")[0]
    assert len(record["annotations"]) == 2
    out = DetrDatasetMapper(is_train=True, augmentation=[])(record)
    assert out["instances"].gt_boxes.tensor.tolist() == [[8, 8, 28, 28]]
    assert out["instances"].gt_classes.tolist() == [0]
