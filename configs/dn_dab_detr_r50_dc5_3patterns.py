"""DN-DAB-DETR-R50-DC5 with 3 patterns, 12-epoch setting (DN-DETR's README: 41.7 AP on val2017).

``dn_dab_detr_r50_dc5.py`` with 3 pattern embeddings (``--num_patterns 3``): 300 anchors x 3
patterns = 900 matching queries, whose content is the "unknown" label embedding plus the
pattern embedding (DN-DETR's transformer adds the patterns to the last 900 content queries).

Schedule: 12 epochs = 12 x 7,393 = 88,716 iterations at total batch 16, the lr x0.1 after epoch
11 (11 x 7,393 = 81,323), the 12-epoch setting of the DN-DETR paper; DN-DETR's README gives no
training command for it (its main.py: ``--epochs 12 --lr_drop 11``).
"""
from .dab_detr_r50 import ITERS_PER_EPOCH
from .dn_dab_detr_r50_dc5 import dataloader, lr_multiplier, model, optimizer, train

model.transformer.num_patterns = 3

lr_multiplier.milestones = [11 * ITERS_PER_EPOCH]
lr_multiplier.num_updates = 12 * ITERS_PER_EPOCH
train.max_iter = 12 * ITERS_PER_EPOCH
train.eval_period = ITERS_PER_EPOCH
train.output_dir = "./output/dn_dab_detr_r50_dc5_3patterns"
