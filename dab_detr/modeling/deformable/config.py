"""yacs config keys of DAB-Deformable-DETR, so that ``build_model(cfg)`` works.

LazyConfig users do not need this: see ``configs/common/models/dab_deformable_detr_r50.py``.
"""
from detectron2.config import CfgNode as CN

from ...config import add_set_loss_config, set_original_backbone_defaults


def add_dab_deformable_detr_config(cfg: CN) -> CN:
    """Add ``cfg.MODEL.DAB_DEFORMABLE_DETR`` and set the backbone/input defaults of the original.

    torchvision-style ResNet-50 with frozen BN, stem and res2 frozen, C3-C5 out; RGB input with
    ImageNet mean/std; the original's model settings (SPEC-deformable section 1.1), except
    80 contiguous classes as Detectron2 datasets use. Returns ``cfg``.
    """
    cfg.MODEL.META_ARCHITECTURE = "DABDeformableDETR"
    cfg.MODEL.DAB_DEFORMABLE_DETR = CN()
    c = cfg.MODEL.DAB_DEFORMABLE_DETR
    c.NUM_CLASSES = 80
    c.NUM_QUERIES = 300
    c.IN_FEATURES = ["res3", "res4", "res5"]
    c.NUM_FEATURE_LEVELS = 4
    c.HIDDEN_DIM = 256
    c.NHEADS = 8
    c.ENC_LAYERS = 6
    c.DEC_LAYERS = 6
    c.DIM_FEEDFORWARD = 2048
    c.DROPOUT = 0.0
    c.ENC_N_POINTS = 4
    c.DEC_N_POINTS = 4
    c.TWO_STAGE = False
    c.NUM_PATTERNS = 0
    c.RANDOM_REFPOINTS_XY = False
    c.FREEZE_ANCHOR_XY = False
    c.LAYER0_BROADCAST_BUG = False
    c.AUX_LOSS = True
    add_set_loss_config(c)
    c.NUM_SELECT = 100
    set_original_backbone_defaults(cfg, out_features=["res3", "res4", "res5"])
    return cfg
