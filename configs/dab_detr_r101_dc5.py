"""DAB-DETR-R101-DC5 (paper Table 2: 45.8 AP): the last ResNet stage dilated, stride 16.

Image position-embedding temperature 20: the paper's setting. (Only the released R50-DC5
checkpoint used 10; no R101-DC5 checkpoint was released.)
"""
from .dab_detr_r101 import dataloader, lr_multiplier, model, optimizer, train

model.backbone.stages.res5_dilation = 2

train.output_dir = "./output/dab_detr_r101_dc5"
