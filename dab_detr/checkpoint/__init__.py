"""Loading checkpoints: safe reading, conversion of released DAB-DETR weights, ImageNet backbones."""
from .backbone_names import convert_torchvision_resnet
from .checkpointer import DABDETRCheckpointer
from .convert import SOURCES, ConversionResult, convert_checkpoint_file, convert_state_dict, detect_layout
from .layout import Variant, dabdetr_shapes, suggest_config
from .safe_load import CheckpointError, UnsafeCheckpointError, load_checkpoint_file

__all__ = [
    "SOURCES",
    "CheckpointError",
    "ConversionResult",
    "DABDETRCheckpointer",
    "UnsafeCheckpointError",
    "Variant",
    "convert_checkpoint_file",
    "convert_state_dict",
    "convert_torchvision_resnet",
    "dabdetr_shapes",
    "detect_layout",
    "load_checkpoint_file",
    "suggest_config",
]
