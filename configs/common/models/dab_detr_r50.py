"""DAB-DETR with a ResNet-50 backbone (C5), the original's settings (SPEC sections 1-7).

Experiments import ``model`` and edit fields, e.g. ``model.transformer.num_patterns = 3``,
``model.position_embedding.temperature_h = 10``, ``model.backbone.stages.res5_dilation = 2`` (DC5; stride 16).
"""
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet

from dab_detr.modeling import (
    make_resnet_stages,
    DABDETR,
    DABTransformer,
    HungarianMatcher,
    PositionEmbeddingSine,
    SetCriterion,
)

model = L(DABDETR)(
    # torchvision-style ResNet (stride in the 3x3 conv), frozen BN; freeze_at=2 freezes the stem
    # and res2 as the original (detrex trains res2: freeze_at=1)
    backbone=L(ResNet)(
        stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
        stages=L(make_resnet_stages)(
            depth=50, stride_in_1x1=False, norm="FrozenBN", res5_dilation=1
        ),
        out_features=["res5"],
        freeze_at=2,
    ),
    in_feature="res5",
    position_embedding=L(PositionEmbeddingSine)(
        num_pos_feats=128, temperature_h=20, temperature_w=20, normalize=True
    ),
    transformer=L(DABTransformer)(
        d_model=256,
        nhead=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dim_feedforward=2048,
        dropout=0.0,
        activation="prelu",
        num_patterns=0,
        modulate_hw_attn=True,
        keep_query_pos=False,
    ),
    criterion=L(SetCriterion)(
        matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2.0),
        weight_dict={"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        focal_alpha=0.25,
        focal_gamma=2.0,
    ),
    num_classes=80,
    num_queries=300,
    aux_loss=True,
    random_refpoints_xy=False,
    freeze_anchor_xy=False,
    select_box_nums_for_evaluation=300,
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
    # DN-DETR's query denoising (dab_detr.modeling.denoising): off, as the original DAB-DETR;
    # the configs/dn_*.py set dict(groups=5, label_noise_scale=0.2, box_noise_scale=0.4)
    denoising=None,
)
