"""The DAB-DETR model: a pure-torch core and one Detectron2 adapter (``dab_detr.py``)."""
from .anchors import AnchorBoxes
from .backbone import make_resnet_stages
from .box_ops import inverse_sigmoid
from .criterion import SetCriterion
from .dab_detr import DABDETR
from .deformable import DABDeformableDETR, DABDeformableTransformer, add_dab_deformable_detr_config
from .matcher import HungarianMatcher
from .mlp import MLP
from .position_encoding import PositionEmbeddingSine, anchor_sine_embedding
from .postprocess import select_top_k
from .transformer import DABTransformer

__all__ = [
    "AnchorBoxes", "DABDETR", "DABDeformableDETR", "DABDeformableTransformer", "add_dab_deformable_detr_config", "DABTransformer", "HungarianMatcher", "MLP", "PositionEmbeddingSine",
    "SetCriterion", "anchor_sine_embedding", "inverse_sigmoid", "make_resnet_stages", "select_top_k",
]
