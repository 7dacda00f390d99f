"""Named helpers for optimizer configs (LazyConfig stores named functions, not lambdas)."""

__all__ = ["backbone_lr_factor"]


def backbone_lr_factor(param_name: str, factor: float = 0.1) -> float:
    """Learning-rate factor of a parameter: ``factor`` for the backbone, 1 elsewhere (SPEC 8:
    backbone lr 1e-5 = 0.1 x 1e-4)."""
    return factor if param_name.startswith("backbone.") else 1.0
