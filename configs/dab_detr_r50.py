"""DAB-DETR R50, the paper's 50-epoch COCO recipe (SPEC sections 1-8): 42.2 AP on val2017.

    python tools/lazyconfig_train_net.py --config-file configs/dab_detr_r50.py --num-gpus 8

Arithmetic: COCO train2017 has 118,287 images (all are used, as in the original); at a total
batch of 16 one epoch is ceil(118287 / 16) = 7,393 iterations, so 50 epochs = 369,650
iterations and the lr drop after epoch 40 is at 40 x 7,393 = 295,720.
"""
from detectron2.config import LazyCall as L
from fvcore.common.param_scheduler import MultiStepParamScheduler

from .common.coco_detr_data import dataloader
from .common.models.dab_detr_r50 import model
from .common.optim import AdamW as optimizer
from .common.train import train

ITERS_PER_EPOCH = 7393  # ceil(118287 / 16)

lr_multiplier = L(MultiStepParamScheduler)(
    values=[1.0, 0.1],
    milestones=[40 * ITERS_PER_EPOCH],  # lr x0.1 after epoch 40
    num_updates=50 * ITERS_PER_EPOCH,
)

# total batch 16 = dataloader.train.total_batch_size x grad_accumulation_steps: with fewer GPUs,
# keep 16, e.g. 4 GPUs x 2 images x 2 accumulation steps:
#   dataloader.train.total_batch_size=8 train.grad_accumulation_steps=2
dataloader.train.total_batch_size = 16
train.max_iter = 50 * ITERS_PER_EPOCH
train.eval_period = 5 * ITERS_PER_EPOCH
train.checkpointer.period = ITERS_PER_EPOCH
train.clip_grad.max_norm = 0.1
train.output_dir = "./output/dab_detr_r50"
# ImageNet-pretrained torchvision ResNet-50 (the original's backbone weights)
train.init_checkpoint = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
