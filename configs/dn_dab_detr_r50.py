"""DN-DETR-R50 (DN-DAB-DETR, DN-DETR's README: 44.4 AP on val2017, 50 epochs).

DAB-DETR-R50 (``dab_detr_r50.py``) trained with query denoising: 5 groups of noised ground truth
per image, labels flipped with probability 0.2, box centres and sizes jittered by up to 0.4
(DN-DETR's main.py defaults ``--scalar 5 --label_noise_scale 0.2 --box_noise_scale 0.4``). The
content query of the 300 matching queries is the label embedding's "unknown" row, in training
and at inference (a DN model has ``label_enc``: 81 x 255 for COCO).

Everything else is DN-DETR's main.py default, which is DAB-DETR's recipe: AdamW lr 1e-4,
backbone lr 1e-5, weight decay 1e-4, gradient clipping 0.1, dropout 0, PReLU, 300 queries, top
300 detections, total batch 16 (README: 8 GPUs x ``--batch_size 2``), 50 epochs with the lr
dropped after epoch 40 (``--epochs 50 --lr_drop 40``): the schedule of ``dab_detr_r50.py``.

    python tools/lazyconfig_train_net.py --config-file configs/dn_dab_detr_r50.py --num-gpus 8
"""
from .dab_detr_r50 import dataloader, lr_multiplier, model, optimizer, train

model.denoising = dict(groups=5, label_noise_scale=0.2, box_noise_scale=0.4)

train.output_dir = "./output/dn_dab_detr_r50"
