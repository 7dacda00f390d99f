"""yacs config keys of DAB-DETR, so that ``build_model(cfg)`` works as the registry promises.

LazyConfig users do not need this: see ``configs/common/models/dab_detr_r50.py``.
"""
from detectron2.config import CfgNode as CN


def add_dab_detr_config(cfg: CN) -> CN:
    """Add ``cfg.MODEL.DAB_DETR`` and set the backbone/input defaults of DAB-DETR R50.

    The defaults are the original's: torchvision-style ResNet-50 (stride in the 3x3 conv),
    frozen BN, stem and res2 frozen, C5 only, RGB input with ImageNet mean/std. Returns ``cfg``.
    """
    cfg.MODEL.META_ARCHITECTURE = "DABDETR"
    cfg.MODEL.DAB_DETR = CN()
    c = cfg.MODEL.DAB_DETR
    c.NUM_CLASSES = 80
    c.NUM_QUERIES = 300
    c.IN_FEATURE = "res5"
    c.HIDDEN_DIM = 256
    c.NHEADS = 8
    c.ENC_LAYERS = 6
    c.DEC_LAYERS = 6
    c.DIM_FEEDFORWARD = 2048
    c.DROPOUT = 0.0
    c.ACTIVATION = "prelu"
    c.NUM_PATTERNS = 0
    c.MODULATE_HW_ATTN = True
    c.KEEP_QUERY_POS = False
    c.RANDOM_REFPOINTS_XY = False
    c.FREEZE_ANCHOR_XY = False
    c.PE_TEMPERATURE_H = 20.0
    c.PE_TEMPERATURE_W = 20.0
    c.AUX_LOSS = True
    add_set_loss_config(c)
    c.NUM_SELECT = 300
    set_original_backbone_defaults(cfg, out_features=["res5"])
    return cfg


def add_set_loss_config(c: CN) -> CN:
    """The loss weights and matching costs of both detectors (the originals'), read by
    ``dab_detr.modeling.criterion_from_config``."""
    c.CLASS_WEIGHT = 1.0
    c.BBOX_WEIGHT = 5.0
    c.GIOU_WEIGHT = 2.0
    c.COST_CLASS = 2.0
    c.COST_BBOX = 5.0
    c.COST_GIOU = 2.0
    c.FOCAL_ALPHA = 0.25
    c.FOCAL_GAMMA = 2.0
    return c


def set_original_backbone_defaults(cfg: CN, out_features) -> CN:
    """The original's backbone and input: torchvision-style ResNet-50 (stride in the 3x3 conv),
    frozen BN, stem and res2 frozen, the given outputs; RGB with ImageNet mean/std (0-255)."""
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
