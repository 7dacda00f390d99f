"""DAB-Deformable-DETR with a ResNet-50 backbone (C3-C5 + one extra level), the original's
settings (SPEC-deformable section 1.1) with Detectron2's 80 contiguous classes.

Experiments import ``model`` and edit fields, e.g. ``model.transformer.two_stage = True``,
``model.num_patterns = 3``, ``model.random_refpoints_xy = True``,
``model.transformer.layer0_broadcast_bug = True`` (only to reproduce the v1 checkpoint).
"""
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet

from dab_detr.modeling import HungarianMatcher, PositionEmbeddingSine, SetCriterion, make_resnet_stages
from dab_detr.modeling.deformable import DABDeformableDETR, DABDeformableTransformer

model = L(DABDeformableDETR)(
    # torchvision-style ResNet (stride in the 3x3 conv), frozen BN; freeze_at=2 freezes the stem
    # and res2 as the original (detrex trains res2: freeze_at=1)
    backbone=L(ResNet)(
        stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
        stages=L(make_resnet_stages)(depth=50, stride_in_1x1=False, norm="FrozenBN"),
        out_features=["res3", "res4", "res5"],
        freeze_at=2,
    ),
    in_features=["res3", "res4", "res5"],
    # Deformable DETR's sine embedding: temperature 10000, positions offset by -0.5
    position_embedding=L(PositionEmbeddingSine)(
        num_pos_feats=128, temperature_h=10000, temperature_w=10000, normalize=True, offset=-0.5
    ),
    transformer=L(DABDeformableTransformer)(
        d_model=256,
        nhead=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dim_feedforward=2048,
        dropout=0.0,
        num_feature_levels=4,
        enc_n_points=4,
        dec_n_points=4,
        two_stage=False,
        two_stage_num_proposals="${..num_queries}",
        layer0_broadcast_bug=False,
    ),
    criterion=L(SetCriterion)(
        matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2.0),
        weight_dict={"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        focal_alpha=0.25,
        focal_gamma=2.0,
    ),
    num_classes=80,
    num_queries=300,
    num_patterns=0,
    aux_loss=True,
    random_refpoints_xy=False,
    freeze_anchor_xy=False,
    select_box_nums_for_evaluation=100,  # the original's top-100
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
    # DN-DETR's query denoising (dab_detr.modeling.denoising): off, as the original DAB-DETR;
    # the configs/dn_*.py set dict(groups=5, label_noise_scale=0.2, box_noise_scale=0.4)
    denoising=None,
)
