"""AdamW of the original recipe (SPEC 8): lr 1e-4, backbone lr 1e-5, weight decay 1e-4 on all
parameters (norms and biases included, as the original)."""
import torch
from detectron2.config import LazyCall as L
from detectron2.solver.build import get_default_optimizer_params

from dab_detr.engine import backbone_lr_factor

AdamW = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(
        # params.model is set to the model by the trainer before instantiation
        base_lr="${..lr}",
        lr_factor_func=backbone_lr_factor,  # backbone x0.1
    ),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
    # one fused kernel for all parameters instead of a loop over ~250 tensors (CPU and CUDA; the
    # same AdamW update, rounded differently)
    fused=True,
)
