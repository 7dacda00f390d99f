"""DAB-DETR-R101-DC5 with 3 pattern embeddings (paper Table 2, DAB-DETR-DC5-R101*: 46.6 AP)."""
from .dab_detr_r101 import dataloader, lr_multiplier, model, optimizer, train

model.backbone.stages.res5_dilation = 2
model.transformer.num_patterns = 3

train.output_dir = "./output/dab_detr_r101_dc5_3patterns"
