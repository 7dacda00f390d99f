"""DN-DAB-Deformable-DETR-R50 (DN-DETR's README: "DN-DAB-Deformable-DETR-R50-v2", 49.5 AP on val2017
in 50 epochs, 48.4 AP in 24).

DAB-Deformable-DETR-R50 (``dab_deformable_detr_r50.py``, one-stage) trained with query
denoising: 5 groups of noised ground truth, label flips 0.2, box noise 0.4 (DN-DETR's main.py
defaults). As in DN-DETR's ``dn_dab_deformable_detr``, the matching queries keep their learned
content queries, 255 wide plus the indicator 0; the label embedding ``label_enc`` (81 x 255)
feeds only the denoising queries. No patterns, no two-stage (DN-DETR has neither for this model).

The recipe is DN-DETR's README command (``--batch_size 2`` on 8 GPUs = total batch 16,
``--epochs 50 --lr_drop 40 --transformer_activation relu``) with main.py's defaults (AdamW lr 1e-4,
backbone 1e-5, weight decay 1e-4, clipping 0.1, top-100 detections): the schedule and optimizer
of ``dab_deformable_detr_r50.py``.

    python tools/lazyconfig_train_net.py --config-file configs/dn_dab_deformable_detr_r50.py --num-gpus 8
"""
from .dab_deformable_detr_r50 import dataloader, lr_multiplier, model, optimizer, train

model.denoising = dict(groups=5, label_noise_scale=0.2, box_noise_scale=0.4)

train.output_dir = "./output/dn_dab_deformable_detr_r50"
