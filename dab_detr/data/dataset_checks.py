"""Load-time checks of detection datasets, with messages that name the file and the annotation.

Behaviour (also in README "Custom data"), per kind of bad data:

| problem                                         | behaviour                                   |
| ----------------------------------------------- | ------------------------------------------- |
| annotation JSON that is not valid JSON          | stop (ValueError naming the file, line and column) |
| image file missing                              | stop (FileNotFoundError listing the files)  |
| image file unreadable (exists, cannot decode)   | training: skip the image with a warning; evaluation: stop (see DetrDatasetMapper) |
| 16-bit grayscale image                          | read scaled to 8 bits (value / 257), see ``image_reading`` |
| box with zero or negative width or height       | drop that annotation with a warning         |
| box with a NaN or infinite coordinate           | drop that annotation with a warning         |
| box entirely outside its image                  | drop that annotation with a warning         |
| image with no (usable) annotation               | training: skip the image with a warning; evaluation: keep it |
| category id not in the dataset's category list  | stop (ValueError naming annotation, image and valid ids) |
"""
import json
import logging
import math
import os
from typing import Dict, List, Optional, Sequence, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.build import print_instances_class_histogram
from detectron2.data.detection_utils import check_metadata_consistency
from detectron2.structures import BoxMode

__all__ = ["load_checked_dataset_dicts", "check_dataset_dicts", "describe_annotation",
           "is_degenerate_box", "box_problem", "explain_load_error"]

logger = logging.getLogger(__name__)
_MAX_LISTED = 5  # how many offending files/annotations a message lists


def describe_annotation(record: Dict, index: int) -> str:
    """'annotation id 7 (index 2, bbox [...]) of image 'path' (image_id 3)' for messages."""
    anno = record["annotations"][index]
    ann_id = f"id {anno['id']}" if "id" in anno else "without id"
    return (f"annotation {ann_id} (index {index}, bbox {list(anno.get('bbox', []))}, "
            f"category_id {anno.get('category_id')}) of image '{record['file_name']}' "
            f"(image_id {record.get('image_id')})")


def is_degenerate_box(bbox: Sequence[float], bbox_mode) -> bool:
    """True when the box has zero or negative width or height (any Detectron2 box mode)."""
    if len(bbox) != 4:
        return True
    if bbox_mode in (BoxMode.XYWH_ABS, BoxMode.XYWH_REL):
        w, h = bbox[2], bbox[3]
    else:
        w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
    return not (w > 0 and h > 0)


_BOX_PROBLEMS = {  # reason -> how the warning describes the dropped annotations
    "non-finite": "whose box has a NaN or infinite coordinate",
    "degenerate": "whose box has zero or negative width/height",
    "outside": "whose box lies entirely outside its image",
}


def box_problem(bbox: Sequence[float], bbox_mode, width: Optional[float] = None,
                height: Optional[float] = None) -> Optional[str]:
    """Why a box cannot be trained on: "non-finite", "degenerate", "outside" (of the image of
    size ``width`` x ``height``, when known), or None when it is usable. A box partly outside the
    image is usable (the mapper clips it)."""
    try:
        coords = [float(v) for v in bbox]
    except (TypeError, ValueError):
        return "non-finite"
    if len(coords) != 4:
        return "degenerate"
    if not all(math.isfinite(v) for v in coords):
        return "non-finite"
    if is_degenerate_box(coords, bbox_mode):
        return "degenerate"
    if width and height and bbox_mode in (BoxMode.XYWH_ABS, BoxMode.XYXY_ABS):
        x0, y0 = coords[0], coords[1]
        x1, y1 = (x0 + coords[2], y0 + coords[3]) if bbox_mode == BoxMode.XYWH_ABS else (coords[2], coords[3])
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            return "outside"
    return None


def _listing(items: List[str]) -> str:
    shown = "\n  ".join(items[:_MAX_LISTED])
    more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"\n  {shown}{more}"


def check_dataset_dicts(dataset_dicts: List[Dict], dataset_name: str, *, num_classes: int = None,
                        check_files: bool = True) -> List[Dict]:
    """Check ``dataset_dicts`` (Detectron2 format, contiguous category ids) in place of use.

    Returns new records where degenerate boxes are removed (each one warned about). Raises
    FileNotFoundError for missing image files and ValueError for category ids outside
    ``range(num_classes)`` (skipped when num_classes is None).
    """
    if check_files:
        missing = [f"'{r['file_name']}' (image_id {r.get('image_id')})"
                   for r in dataset_dicts if not os.path.isfile(r["file_name"])]
        if missing:
            raise FileNotFoundError(
                f"dataset '{dataset_name}': {len(missing)} of {len(dataset_dicts)} image files "
                f"do not exist:{_listing(missing)}\nCheck the image root of the dataset.")

    bad_category, checked = [], []
    dropped: Dict[str, List[str]] = {reason: [] for reason in _BOX_PROBLEMS}
    for record in dataset_dicts:
        annos = record.get("annotations")
        if annos is None:
            checked.append(record)
            continue
        kept = []
        for index, anno in enumerate(annos):
            category = anno.get("category_id")
            problem = box_problem(anno.get("bbox", []), anno.get("bbox_mode", BoxMode.XYWH_ABS),
                                  record.get("width"), record.get("height"))
            if num_classes is not None and not (isinstance(category, int) and 0 <= category < num_classes):
                bad_category.append(describe_annotation(record, index))
            elif problem is not None:
                dropped[problem].append(describe_annotation(record, index))
            else:
                kept.append(anno)
        checked.append({**record, "annotations": kept})

    if bad_category:
        raise ValueError(
            f"dataset '{dataset_name}': {len(bad_category)} annotations have a category id outside "
            f"the dataset's {num_classes} classes (contiguous ids 0..{num_classes - 1}):"
            f"{_listing(bad_category)}")
    for reason, items in dropped.items():
        if items:
            logger.warning("dataset '%s': dropped %d annotations %s:%s", dataset_name, len(items),
                           _BOX_PROBLEMS[reason], _listing(items))
    return checked


def _explain_unknown_category(dataset_name: str, json_file: Optional[str], error: KeyError) -> Exception:
    """Turn load_coco_json's KeyError for an unknown category id into a message naming the
    annotation, the image and the file (read again from the json only in this failure case)."""
    if json_file is None or not os.path.isfile(json_file):
        return ValueError(f"dataset '{dataset_name}': {error}")
    with open(json_file, encoding="utf-8") as f:
        coco = json.load(f)
    valid = sorted(c["id"] for c in coco.get("categories", []))
    files = {img["id"]: img.get("file_name") for img in coco.get("images", [])}
    bad = [f"annotation id {a.get('id')} (category_id {a.get('category_id')}) of image "
           f"'{files.get(a.get('image_id'))}' (image_id {a.get('image_id')})"
           for a in coco.get("annotations", []) if a.get("category_id") not in set(valid)]
    return ValueError(
        f"dataset '{dataset_name}' ({json_file}): {len(bad)} annotations have a category id that "
        f"is not in the file's 'categories' (valid ids: {valid}):{_listing(bad)}")


def explain_load_error(dataset_name: str, json_file: Optional[str], error: Exception) -> Optional[Exception]:
    """A ValueError naming the file (and the annotation, image, position) for what
    ``load_coco_json`` raises on bad annotation files, or None for other errors."""
    if isinstance(error, json.JSONDecodeError):
        return ValueError(
            f"dataset '{dataset_name}': annotation file {json_file} is not valid JSON: {error.msg} "
            f"at line {error.lineno}, column {error.colno} (character {error.pos})")
    if isinstance(error, KeyError) and "category_id" in str(error):
        return _explain_unknown_category(dataset_name, json_file, error)
    return None


def load_checked_dataset_dicts(names: Union[str, Sequence[str]], *, filter_empty: bool = True,
                               check_files: bool = True) -> List[Dict]:
    """Detectron2's ``get_detection_dataset_dicts`` plus the checks of this module.

    names: registered dataset names. filter_empty: drop images without usable annotations (for
    training; a warning lists them). Returns the list of checked dataset dicts.
    """
    names = [names] if isinstance(names, str) else list(names)
    dicts = []
    for name in names:
        if name not in DatasetCatalog.list():
            raise KeyError(f"dataset '{name}' is not registered; registered datasets: "
                           f"{sorted(DatasetCatalog.list())}")
        try:
            dicts.extend(DatasetCatalog.get(name))
        except (KeyError, ValueError) as e:  # invalid JSON, category id missing from 'categories'
            explained = explain_load_error(name, MetadataCatalog.get(name).get("json_file", None), e)
            if explained is None:
                raise
            raise explained from e
    if len(names) > 1:
        check_metadata_consistency("thing_classes", names)
    thing_classes = MetadataCatalog.get(names[0]).get("thing_classes", None)
    num_classes = len(thing_classes) if thing_classes is not None else None
    checked = check_dataset_dicts(dicts, ",".join(names), num_classes=num_classes,
                                  check_files=check_files)

    if thing_classes is not None and checked and "annotations" in checked[0]:
        print_instances_class_histogram(checked, thing_classes)

    if filter_empty:
        empty = [f"'{r['file_name']}' (image_id {r.get('image_id')})" for r in checked
                 if "annotations" in r and not any(a.get("iscrowd", 0) == 0 for a in r["annotations"])]
        if empty:
            logger.warning("dataset '%s': skipping %d of %d images that have no usable annotation "
                           "in training:%s", ",".join(names), len(empty), len(checked), _listing(empty))
            checked = [r for r in checked if any(a.get("iscrowd", 0) == 0 for a in r.get("annotations", []))]
        if not checked:
            raise ValueError(f"dataset '{','.join(names)}' has no image with a usable annotation")
    return checked
