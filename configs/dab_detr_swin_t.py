"""DAB-DETR with a Swin-T backbone, as detrex's DAB-DETR Swin-T (45.2 AP on COCO val2017).

Detectron2's ``SwinTransformer`` replaces the ResNet; DAB-DETR uses its last stage only ("p3":
768 channels, stride 32). Images are batched padded to a multiple of 32 (the backbone's
``size_divisibility``, which ``dab_detr.modeling.swin`` repairs in Detectron2's class) so that the
padding mask stays aligned with the feature map. Input normalization stays ImageNet mean/std in
0-255 RGB, as detrex uses for Swin; drop path 0.1 and no frozen stages, as detrex.
"""
from detectron2.config import LazyCall as L

from dab_detr.modeling.swin import SwinTransformer  # Detectron2's, with its size_divisibility fixed

from .dab_detr_r50 import dataloader, lr_multiplier, model, optimizer, train

model.backbone = L(SwinTransformer)(
    embed_dim=96,
    depths=(2, 2, 6, 2),
    num_heads=(3, 6, 12, 24),
    window_size=7,
    drop_path_rate=0.1,
    out_indices=(3,),
)
model.in_feature = "p3"

# the official ImageNet-1k Swin-T weights; their names (patch_embed.*, layers.*) are matched to
# backbone.* by Detectron2's name heuristics, which the URL query turns on
train.init_checkpoint = (
    "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
    "swin_tiny_patch4_window7_224.pth?matching_heuristics=True"
)
train.output_dir = "./output/dab_detr_swin_t"
