"""DAB-DETR-R50-DC5 with 3 pattern embeddings (paper Table 2, DAB-DETR-DC5-R50*: 45.7 AP).

Dilated last stage (stride 16) and 300 anchors x 3 patterns = 900 decoder queries. Image
position-embedding temperature 20 (the default), as its released checkpoint.
"""
from .dab_detr_r50 import dataloader, lr_multiplier, model, optimizer, train

model.backbone.stages.res5_dilation = 2
model.transformer.num_patterns = 3

train.output_dir = "./output/dab_detr_r50_dc5_3patterns"
