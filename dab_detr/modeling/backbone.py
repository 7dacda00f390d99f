"""ResNet stages for Detectron2's ``ResNet``, with the torchvision-style dilated C5 (DC5)."""
from typing import List

from detectron2.modeling.backbone import BottleneckBlock, ResNet


def make_resnet_stages(
    depth: int = 50, stride_in_1x1: bool = False, norm: str = "FrozenBN", res5_dilation: int = 1
) -> List[List]:
    """``ResNet.make_default_stages`` plus an optional dilated last stage.

    Args:
        depth: 18, 34, 50, 101 or 152.
        stride_in_1x1: False for torchvision-style weights (stride in the 3x3 conv), which the
            DAB-DETR checkpoints use; True for the MSRA weights of Detectron2's model zoo.
        norm: normalization of every conv ("FrozenBN", "BN", "GN", ...).
        res5_dilation: 1 (stride 32), or 2 for DC5: res5 keeps stride 16 and its 3x3 convs are
            dilated. As in torchvision's ``replace_stride_with_dilation`` (which trained the
            released DC5 checkpoints), the first res5 block keeps dilation 1 and only the later
            blocks use 2; Detectron2's yacs builder dilates all three, which would not match.
            Bottleneck ResNets only.

    Returns:
        The ``stages`` argument of ``detectron2.modeling.backbone.ResNet``.
    """
    if res5_dilation not in (1, 2):
        raise ValueError(f"res5_dilation must be 1 or 2, got {res5_dilation}")
    # BasicBlock (depth < 50) has a single 3x3 conv per branch: stride_in_1x1 does not apply
    block_kwargs = {"stride_in_1x1": stride_in_1x1} if depth >= 50 else {}
    stages = ResNet.make_default_stages(depth, norm=norm, **block_kwargs)
    if res5_dilation == 1:
        return stages
    if depth < 50:
        raise ValueError(f"a dilated res5 (DC5) needs a bottleneck ResNet (depth >= 50), got depth={depth}")
    num_blocks = len(stages[-1])
    stages[-1] = ResNet.make_stage(
        block_class=BottleneckBlock,
        num_blocks=num_blocks,
        stride_per_block=[1] * num_blocks,
        dilation_per_block=[1] + [res5_dilation] * (num_blocks - 1),
        in_channels=1024,
        out_channels=2048,
        bottleneck_channels=512,
        stride_in_1x1=stride_in_1x1,
        norm=norm,
    )
    return stages
