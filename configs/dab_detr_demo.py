"""The CPU demo: DAB-DETR trained from scratch on the embedded synthetic dataset (``make demo``).

Same model code as the COCO configs at a CPU-friendly size: a small Detectron2 ResNet (one
BasicBlock per stage, 32/64/128 channels, up to res4 = stride 16) with trainable BN and no
pretrained weights (none can be downloaded here), d_model 128, 3 encoder + 3 decoder layers,
30 anchors, 4 classes, ~160 px images. The dataset (``dab_detr.data.demo_dataset``) is
generated on first use under $DETECTRON2_DATASETS/dab_demo.
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf

from dab_detr.data.demo_dataset import DEMO_CLASSES, register_demo_dataset

from .common.coco_detr_data import dataloader
from .common.models.dab_detr_r50 import model
from .common.optim import AdamW as optimizer
from .common.train import train

register_demo_dataset()  # dab_demo_train / dab_demo_val (lazy: generated when first loaded)

# ---------------------------------------------------------------- model: small, from scratch
model.num_classes = len(DEMO_CLASSES)  # the one place the class count is set
WIDTH = 32
model.backbone = L(ResNet)(
    stem=L(BasicStem)(in_channels=3, out_channels=WIDTH, norm="BN"),
    stages=[  # res2 (stride 4), res3 (8), res4 (16): one BasicBlock each
        L(ResNet.make_stage)(block_class=BasicBlock, num_blocks=1, stride_per_block=[stride],
                             in_channels=c_in, out_channels=c_out, norm="BN")
        for stride, c_in, c_out in [(1, WIDTH, WIDTH), (2, WIDTH, 2 * WIDTH), (2, 2 * WIDTH, 4 * WIDTH)]
    ],
    out_features=["res4"],
    freeze_at=0,
)
model.in_feature = "res4"
model.transformer.update(d_model=128, nhead=8, num_encoder_layers=3, num_decoder_layers=3, dim_feedforward=512)
model.position_embedding.num_pos_feats = 64
model.num_queries = 30
model.random_refpoints_xy = True  # anchor centres spread uniformly over the image
model.select_box_nums_for_evaluation = 100

# ---------------------------------------------------------------- data: the embedded dataset
dataloader.train.dataset.names = "dab_demo_train"
dataloader.train.dataset.filter_empty = True
dataloader.train.mapper.augmentation = [
    L(T.RandomFlip)(),
    L(T.ResizeShortestEdge)(
        short_edge_length=(144, 160, 176), max_size=224, sample_style="choice"),
]
dataloader.train.mapper.augmentation_with_crop = None
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "dab_demo_val"
dataloader.test.mapper.augmentation = [
    L(T.ResizeShortestEdge)(
        short_edge_length=160, max_size=224),
]
dataloader.test.num_workers = 1

# ---------------------------------------------------------------- schedule
# 1,600 training images / batch 8 = 200 iterations per epoch; 3,300 iterations = 16.5 epochs,
# 13 minutes at 0.236 s per iteration on 2 cores (measured); lr x0.1 for the last 500 iterations
ITERS_PER_EPOCH = 200
train.max_iter = 3300
optimizer.lr = 2e-4
optimizer.params.lr_factor_func = None  # no pretrained backbone: same lr everywhere
optimizer.weight_decay = 1e-4
lr_multiplier = L(MultiStepParamScheduler)(
    values=[1.0, 0.1], milestones=[2800], num_updates=train.max_iter,
)
train.clip_grad.max_norm = 0.1
train.eval_period = 0  # evaluated once at the end by tools/demo.py
train.checkpointer.period = 5 * ITERS_PER_EPOCH
train.checkpointer.max_to_keep = 2
train.log_period = 50
train.output_dir = "./output/dab_detr_demo"
train.init_checkpoint = ""
train.seed = 0
