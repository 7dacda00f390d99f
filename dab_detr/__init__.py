"""DAB-DETR (Dynamic Anchor Boxes are Better Queries for DETR, ICLR 2022) for Detectron2.

Importing the package registers ``DABDETR`` in Detectron2's ``META_ARCH_REGISTRY``.
``Predictor`` runs a trained detector of a LazyConfig on images (see ``dab_detr.predictor``).
"""
from .config import add_dab_detr_config
from .modeling import DABDETR
from .predictor import Predictor

__version__ = "0.1.0"
__all__ = ["DABDETR", "Predictor", "add_dab_detr_config"]
