"""yacs config keys of both detectors, so that ``build_model(cfg)`` works as the registry promises.

One table: the keys both detectors read (``SHARED_KEYS``: model size, queries, anchors, the set
loss, the fast backbone switch) plus each detector's own. LazyConfig users do not need this: see
``configs/common/models/``.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_dab_detr_config", "add_dab_deformable_detr_config", "SHARED_KEYS"]

# the originals' values (SPEC.md, SPEC-deformable.md), 80 contiguous classes as Detectron2 datasets use
SHARED_KEYS = {
    "NUM_CLASSES": 80, "NUM_QUERIES": 300, "HIDDEN_DIM": 256, "NHEADS": 8, "ENC_LAYERS": 6, "DEC_LAYERS": 6,
    "DIM_FEEDFORWARD": 2048, "DROPOUT": 0.0, "NUM_PATTERNS": 0, "RANDOM_REFPOINTS_XY": False,
    "FREEZE_ANCHOR_XY": False, "AUX_LOSS": True,
    # fold frozen BN into the backbone's convs, NHWC conv weights (SetPredictionDetector)
    "FAST_BACKBONE": True,
    # loss weights and matching costs (read by criterion_from_config)
    "CLASS_WEIGHT": 1.0, "BBOX_WEIGHT": 5.0, "GIOU_WEIGHT": 2.0, "COST_CLASS": 2.0, "COST_BBOX": 5.0,
    "COST_GIOU": 2.0, "FOCAL_ALPHA": 0.25, "FOCAL_GAMMA": 2.0,
}
DAB_DETR_KEYS = {
    "IN_FEATURE": "res5", "ACTIVATION": "prelu", "MODULATE_HW_ATTN": True, "KEEP_QUERY_POS": False,
    "PE_TEMPERATURE_H": 20.0, "PE_TEMPERATURE_W": 20.0, "NUM_SELECT": 300,
}
DAB_DEFORMABLE_DETR_KEYS = {
    "IN_FEATURES": ["res3", "res4", "res5"], "NUM_FEATURE_LEVELS": 4, "ENC_N_POINTS": 4, "DEC_N_POINTS": 4,
    "TWO_STAGE": False, "LAYER0_BROADCAST_BUG": False, "NUM_SELECT": 100,
}


def _add(cfg: CN, meta_architecture: str, node: str, own_keys: dict, out_features) -> CN:
    cfg.MODEL.META_ARCHITECTURE = meta_architecture
    c = CN()
    for key, value in {**SHARED_KEYS, **own_keys}.items():
        setattr(c, key, list(value) if isinstance(value, list) else value)
    setattr(cfg.MODEL, node, c)
    # the original's backbone and input: torchvision-style ResNet-50 (stride in the 3x3 conv),
    # frozen BN, stem and res2 frozen; RGB with ImageNet mean/std (0-255)
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.OUT_FEATURES = list(out_features)
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    cfg.INPUT.FORMAT = "RGB"
    return cfg


def add_dab_detr_config(cfg: CN) -> CN:
    """Add ``cfg.MODEL.DAB_DETR`` and set the backbone/input defaults of DAB-DETR R50 (C5 only).
    Returns ``cfg``."""
    return _add(cfg, "DABDETR", "DAB_DETR", DAB_DETR_KEYS, ["res5"])


def add_dab_deformable_detr_config(cfg: CN) -> CN:
    """Add ``cfg.MODEL.DAB_DEFORMABLE_DETR`` and set the backbone/input defaults of the original
    (C3-C5 out). Returns ``cfg``."""
    return _add(cfg, "DABDeformableDETR", "DAB_DEFORMABLE_DETR", DAB_DEFORMABLE_DETR_KEYS, ["res3", "res4", "res5"])
