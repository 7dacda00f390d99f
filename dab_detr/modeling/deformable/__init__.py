"""DAB-Deformable-DETR: dynamic anchor boxes in a multi-scale deformable transformer.

Importing this package registers ``DABDeformableDETR`` in Detectron2's ``META_ARCH_REGISTRY``.
"""
from ...config import add_dab_deformable_detr_config
from .dab_deformable_detr import DABDeformableDETR
from .deformable_transformer import DABDeformableTransformer
from .ms_deform_attn import MSDeformAttn, multi_scale_deformable_attention

__all__ = [
    "DABDeformableDETR", "DABDeformableTransformer", "MSDeformAttn", "add_dab_deformable_detr_config",
    "multi_scale_deformable_attention",
]
