"""The DAB-DETR checkpoint layouts that ``tools/convert_checkpoint.py --source`` reads: one module
of renaming rules per publisher. Adding a layout = one module here (a ``LAYOUT``) + one test."""
from typing import Dict, Sequence

from .base import SourceLayout
from .detrex import LAYOUT as DETREX
from .dn_detr import LAYOUT as DN_DETR
from .hf import LAYOUT as HF
from .mmdet import LAYOUT as MMDET
from .original import LAYOUT as ORIGINAL

__all__ = ["LAYOUTS", "SourceLayout", "looks_like"]

# the order in which a state dict's keys are recognized (most distinctive first)
LAYOUTS: Dict[str, SourceLayout] = {layout.name: layout for layout in (ORIGINAL, DETREX, HF, MMDET, DN_DETR)}
_DETECTION_ORDER = (HF, MMDET, DETREX, DN_DETR, ORIGINAL)  # DN-DETR's = the original's + label_enc


def looks_like(keys: Sequence[str]) -> str:
    """The name of the layout whose keys these are, "ours", or "unknown"."""
    keys = list(keys)
    for layout in _DETECTION_ORDER:
        if layout.looks_like(keys):
            return layout.name
    if "transformer.encoder.layers.0.linear1.weight" in keys:
        return "ours"
    return "unknown"
