"""DAB-DETR R50 as MMDetection 3.3.0 computes it, to evaluate its released checkpoint
(``dab-detr_r50_8xb2-50e_coco_20221122_120837-c1035c8c.pth``, 42.3 AP published by MMDetection)
after ``tools/convert_checkpoint.py --source mmdet``.

The architecture and weights are the original's (SPEC-mmdet section 3.2); two computations differ
(SPEC-mmdet section 3.1) and are reproduced here:

- the decoder's anchor update clamps ``inverse_sigmoid`` at 1e-5 (mmdet's default), not 1e-3
  (``layers/transformer/dab_detr_layers.py:236-237``); the output head keeps 1e-3 in both;
- boxes are clipped to the image in post-processing (``dense_heads/detr_head.py:620-628``).

80 classes in mmdet's order = Detectron2's COCO order. Not reproduced: mmdet's test resize
(cv2 bilinear, ``int(x * f + 0.5)`` per side) and JPEG decoding, which are data-pipeline choices.
"""
from .dab_detr_r50 import dataloader, lr_multiplier, model, optimizer, train

model.transformer.anchor_update_eps = 1e-5
model.clip_boxes_to_image = True

train.output_dir = "./output/dab_detr_r50_mmdet"
