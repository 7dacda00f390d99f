"""DAB-DETR-R50-DC5 "fixxy" (released checkpoint: 44.7 AP): anchor centres drawn uniformly in the image.

The anchors' x, y start at inverse_sigmoid(U(0, 1)). The original meant to freeze them, but its
freeze is a no-op (SPEC section 5), so the centres train here too, reproducing the released
model; ``model.freeze_anchor_xy = True`` freezes them for real. Image position-embedding
temperature 20 (the default), as its released checkpoint.
"""
from .dab_detr_r50 import dataloader, lr_multiplier, model, optimizer, train

model.backbone.stages.res5_dilation = 2
model.random_refpoints_xy = True

train.output_dir = "./output/dab_detr_r50_dc5_fixxy"
