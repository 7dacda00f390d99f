"""The configs of the model zoo, found by name whether dab_detr runs from the repository or from an
installed wheel (Detectron2's ``detectron2.model_zoo`` style)::

    from dab_detr import model_zoo
    cfg = model_zoo.get_config("dab_detr_r50.py")           # a LazyConfig
    path = model_zoo.get_config_file("configs/dab_detr_r50_dc5.py")
"""
from .model_zoo import available_configs, get_config, get_config_file, resolve_config_file

__all__ = ["available_configs", "get_config", "get_config_file", "resolve_config_file"]
