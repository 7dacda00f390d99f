"""DAB-DETR-R101 (paper Table 2: 43.5 AP; 63 M parameters)."""
from .dab_detr_r50 import dataloader, lr_multiplier, model, optimizer, train

model.backbone.stages.depth = 101

# torchvision's ImageNet ResNet-101 (the weights the original code used); the checkpointer
# renames torchvision ResNet parameters to Detectron2's. Detectron2's model zoo has no
# torchvision-style R-101.pkl (its MSRA R-101.pkl has the stride in the 1x1 conv and BGR input).
train.init_checkpoint = "https://download.pytorch.org/models/resnet101-63fe2227.pth"
train.output_dir = "./output/dab_detr_r101"
