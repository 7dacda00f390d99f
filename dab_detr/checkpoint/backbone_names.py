"""ResNet parameter names: torchvision's (used by the original DAB-DETR, timm and transformers)
to Detectron2's (used by our backbone), and the expected backbone state dict of Detectron2."""
import re
from typing import Dict, Optional, Tuple

import torch

__all__ = [
    "torchvision_to_d2_resnet_name",
    "is_torchvision_resnet_state_dict",
    "convert_torchvision_resnet",
    "d2_resnet_shapes",
    "d2_swin_shapes",
    "resnet_depth_from_d2_keys",
]

# blocks per stage (res2..res5) of the depths DAB-DETR uses
_RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def torchvision_to_d2_resnet_name(name: str) -> Optional[str]:
    """``layer1.0.bn2.weight`` -> ``res2.0.conv2.norm.weight``; ``None`` for the classifier
    (``fc.*``) and ``num_batches_tracked`` (FrozenBatchNorm has neither)."""
    if name.startswith("fc.") or name.endswith("num_batches_tracked"):
        return None
    if name.startswith("conv1."):
        return "stem." + name
    if name.startswith("bn1."):
        return "stem.conv1.norm." + name[len("bn1."):]
    m = re.match(r"layer([1-4])\.(\d+)\.(.+)$", name)
    if m is None:
        raise KeyError(name)
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^bn([1-3])\.", r"conv\1.norm.", rest)
    rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
    rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
    if not re.match(r"(conv[1-3]|shortcut)\.((norm\.)?(weight|bias|running_mean|running_var))$", rest):
        raise KeyError(name)
    return f"res{stage}.{block}.{rest}"


def is_torchvision_resnet_state_dict(state_dict: Dict) -> bool:
    """True for a torchvision-format ResNet state dict (``conv1.weight``, ``layer1.0...``)."""
    return "conv1.weight" in state_dict and any(k.startswith("layer1.0.") for k in state_dict)


def convert_torchvision_resnet(state_dict: Dict[str, torch.Tensor], prefix: str = "") -> Dict[str, torch.Tensor]:
    """Rename a torchvision ResNet state dict to Detectron2 names (with ``prefix`` prepended),
    dropping ``fc.*`` and ``num_batches_tracked``. Unknown names raise ``KeyError`` listing them."""
    out, unknown = {}, []
    for name, value in state_dict.items():
        try:
            new = torchvision_to_d2_resnet_name(name)
        except KeyError:
            unknown.append(name)
            continue
        if new is not None:
            out[prefix + new] = value
    if unknown:
        raise KeyError(f"not ResNet parameters of torchvision's layout: {sorted(unknown)}")
    return out


def _meta_state_shapes(module_fn) -> Dict[str, Tuple[int, ...]]:
    with torch.device("meta"):
        module = module_fn()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def d2_resnet_shapes(depth: int) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of the state dict of Detectron2's ResNet-``depth`` with frozen BN, as
    DAB-DETR builds it (output res5, no classifier). DC5 has the same parameters."""
    from detectron2.modeling.backbone import BasicStem, ResNet

    if depth not in _RESNET_BLOCKS:
        raise ValueError(f"ResNet depth {depth} is not one of {sorted(_RESNET_BLOCKS)}")
    return _meta_state_shapes(lambda: ResNet(
        BasicStem(in_channels=3, out_channels=64, norm="FrozenBN"),
        ResNet.make_default_stages(depth, stride_in_1x1=False, norm="FrozenBN"),
        out_features=["res5"],
    ))


def d2_swin_shapes(embed_dim: int = 96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                   out_indices=(3,)) -> Dict[str, Tuple[int, ...]]:
    """State-dict shapes of Detectron2's SwinTransformer-T as ``configs/dab_detr_swin_t.py`` builds
    it: only the last stage is an output (``out_indices=(3,)``, one output norm ``norm3``)."""
    from detectron2.modeling.backbone import SwinTransformer

    # built on the CPU: its constructor calls .item(), which meta tensors do not have
    module = SwinTransformer(embed_dim=embed_dim, depths=depths, num_heads=num_heads, out_indices=out_indices)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def resnet_depth_from_d2_keys(keys, prefix: str = "backbone.") -> Optional[int]:
    """50 or 101 from the number of res4 blocks in Detectron2 names; None if not a ResNet."""
    blocks = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"res4\.(\d+)\.", k))}
    for depth, per_stage in _RESNET_BLOCKS.items():
        if len(blocks) == per_stage[2]:
            return depth
    return None
