"""DN-DETR-R50-DC5 (DN-DETR's README: 46.3 AP on val2017, 50 epochs).

``dn_dab_detr_r50.py`` with the last ResNet stage dilated (stride 16; DN-DETR's ``--dilation``).
The image position-embedding temperature stays 20, DN-DETR's main.py default (the released
DAB-DETR-R50-DC5 checkpoint, ``dab_detr_r50_dc5.py``, was trained with 10).
"""
from .dn_dab_detr_r50 import dataloader, lr_multiplier, model, optimizer, train

model.backbone.stages.res5_dilation = 2

train.output_dir = "./output/dn_dab_detr_r50_dc5"
