"""DAB-DETR-R101 with 3 pattern embeddings (paper Table 2, DAB-DETR-R101*: 44.1 AP)."""
from .dab_detr_r101 import dataloader, lr_multiplier, model, optimizer, train

model.transformer.num_patterns = 3

train.output_dir = "./output/dab_detr_r101_3patterns"
