"""``--source dn-detr``: IDEA-Research/DN-DETR's ``checkpoint.pth`` (DN-DAB-DETR; key lists in
``shared/spec-data/dn_*_keys.txt``).

The file is the original DAB-DETR's (``original.py``: ``{"model", "optimizer", "args", ...}``,
torchvision ResNet under ``backbone.0.body.``, a second copy of the box head under
``transformer.decoder.bbox_embed``) plus the label embedding of query denoising,
``label_enc.weight`` [92, 255]: rows indexed by COCO category id (0..90) and a last "unknown"
row, the content of the matching queries. The converter keeps the 80 rows of Detectron2's
contiguous classes and the "unknown" row (``convert._map_label_embedding``). DN-DETR's
DAB-Deformable-DETR files are converted by ``deformable_convert`` (source ``dn-detr``).
"""
from .base import SourceLayout
from .original import RULES, read

LAYOUT = SourceLayout(
    name="dn-detr",
    description="IDEA-Research/DN-DETR's checkpoint.pth (DN-DAB-DETR, DN-DAB-Deformable-DETR)",
    rules=RULES,
    looks_like=lambda keys: "label_enc.weight" in keys and any(k.startswith("backbone.0.body.") for k in keys),
    read=read,
    example_prefixes=("label_enc.",),
)
