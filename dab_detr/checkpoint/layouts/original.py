"""``--source original``: IDEA-Research/DAB-DETR's ``checkpoint.pth`` (SPEC section 9).

The file is ``{"model": ..., "optimizer": ..., "args": argparse.Namespace}``. Transformer and
head names are already ours; the torchvision ResNet under ``backbone.0.body.`` gets Detectron2
names; ``transformer.decoder.bbox_embed`` is a second copy of ``bbox_embed``. The saved command
line tells DC5 (``dilation``), the image-PE temperature and the fixxy anchors.
"""
import argparse

from ..rename import to, torchvision_backbone
from ..safe_load import CheckpointError
from .base import SourceLayout

RULES = [
    (r"^backbone\.0\.body\.(.+)$", torchvision_backbone),
    (r"^transformer\.decoder\.bbox_embed\.(.+)$", to(r"bbox_embed.\1")),  # copy of bbox_embed
    (r"^(.+)$", to(r"\1")),  # everything else: the same name (checked against our layout)
]


def read(obj, path):
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: an original DAB-DETR checkpoint is a dict with the weights under "
                              f"'model'; this one has keys {keys}")
    settings = {}
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):  # the original repository's command line
        if hasattr(args, "dilation"):
            settings["dilation"] = bool(args.dilation)
        if hasattr(args, "pe_temperatureH"):
            settings["pe_temperature"] = (args.pe_temperatureH, getattr(args, "pe_temperatureW", args.pe_temperatureH))
        if hasattr(args, "random_refpoints_xy"):
            settings["random_refpoints_xy"] = bool(args.random_refpoints_xy)
    return obj["model"], settings


LAYOUT = SourceLayout(
    name="original",
    description="IDEA-Research/DAB-DETR's checkpoint.pth",
    rules=RULES,
    looks_like=lambda keys: any(k.startswith("backbone.0.body.") for k in keys),
    read=read,
    example_prefixes=("backbone.0.body.",),
)
