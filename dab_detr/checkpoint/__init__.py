"""Loading checkpoints: safe reading, conversion of released DAB-DETR weights (one module of rules
per publisher in ``layouts/``), ImageNet backbones, and a strict check that a checkpoint fits."""
from .backbone_names import convert_torchvision_resnet
from .checkpointer import DABDETRCheckpointer, load_command_line_weights
from .convert import SOURCES, ConversionResult, convert_checkpoint_file, convert_state_dict, detect_layout
from .eval_config import EvalCommand, eval_command, suggest_config
from .layout import Variant, dabdetr_shapes
from .layouts import LAYOUTS, SourceLayout
from .safe_load import CheckpointError, UnsafeCheckpointError, load_checkpoint_file

__all__ = [
    "LAYOUTS",
    "SOURCES",
    "CheckpointError",
    "ConversionResult",
    "DABDETRCheckpointer",
    "EvalCommand",
    "SourceLayout",
    "UnsafeCheckpointError",
    "Variant",
    "convert_checkpoint_file",
    "convert_state_dict",
    "convert_torchvision_resnet",
    "dabdetr_shapes",
    "detect_layout",
    "eval_command",
    "load_checkpoint_file",
    "load_command_line_weights",
    "suggest_config",
]
