"""DAB-Deformable-DETR-R50, the original's 50-epoch recipe (48.7 AP for the released v2 weights).

Same optimization and data as DAB-DETR-R50 (``dab_detr_r50.py``): AdamW lr 1e-4, backbone lr
1e-5, weight decay 1e-4, gradient clipping 0.1, total batch 16, 50 epochs with lr x0.1 after 40,
DETR's multi-scale augmentation. The model differs: 4 feature levels (C3-C5 and a stride-2 conv on
C5), deformable encoder and cross-attention, one head per decoder layer, learned content queries,
top-100 detections at inference, loss weights class 1 / L1 5 / GIoU 2 (the original's main.py).
There is no lr multiplier on ``sampling_offsets`` in the original DAB code (Deformable DETR has 0.1).

To evaluate the released checkpoints, convert them first (tools/convert_checkpoint.py, see
README) and set ``train.init_checkpoint`` to the converted file.
"""
from .common.models.dab_deformable_detr_r50 import model
from .dab_detr_r50 import dataloader, lr_multiplier, optimizer, train

train.output_dir = "./output/dab_deformable_detr_r50"
