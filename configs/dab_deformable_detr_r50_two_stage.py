"""DAB-Deformable-DETR-R50, two-stage as detrex implements it (49.7 AP for detrex's weights).

The encoder proposes one box per token (centre of the token, size 0.05 * 2^level); a 7th class
head scores them by their max class logit and a 7th box head refines them. The top 300 become the
decoder's anchors, and their encoder features (detached) its content queries; there are no
learned queries. The selected proposals get their own losses (``*_enc``, real classes, weights
1 / 5 / 2). The original repository's two-stage code does not run and is not reproduced.

detrex trained its weights with res2 unfrozen (``model.backbone.freeze_at = 1``) and no weight
decay on norms; neither matters for evaluating the converted checkpoint.
"""
from .dab_deformable_detr_r50 import dataloader, lr_multiplier, model, optimizer, train

model.transformer.two_stage = True
train.output_dir = "./output/dab_deformable_detr_r50_two_stage"
