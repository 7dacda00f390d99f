"""ImageNet backbones through train.init_checkpoint (DABDETRCheckpointer): a torchvision ResNet
.pth, Detectron2's torchvision-converted R-50.pkl and the MSRA (Caffe2) R-101.pkl. Every backbone
tensor the file holds must end up in the model."""
import pickle
import re

import pytest
import torch
import torchvision
from conftest import MODEL_CONFIG
from detectron2.config import LazyConfig, instantiate
from reference_models import _tv_to_d2, original_checkpoint, random_original_state_dict

from dab_detr.checkpoint import CheckpointError, DABDETRCheckpointer


def _model(depth=50):
    torch.manual_seed(0)
    cfg = LazyConfig.load(MODEL_CONFIG).model
    cfg.backbone.stages.depth = depth
    return instantiate(cfg).eval()


@pytest.fixture(scope="module")
def r50():
    return _model(50)


def _random_torchvision_resnet(depth=50, seed=0):
    torch.manual_seed(seed)
    net = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth](weights=None)
    sd = net.state_dict()
    for k, v in sd.items():  # trained-looking BN statistics instead of the 0/1 defaults
        if k.endswith(("running_mean", "bias")) and v.dtype.is_floating_point:
            v.copy_(torch.randn_like(v) * 0.1)
        elif k.endswith(("running_var", "bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")):
            v.copy_(torch.rand_like(v) + 0.5)
    return sd


def _backbone_state(model):
    return {k[len("backbone."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.")}


def test_torchvision_resnet_pth_loads_every_backbone_tensor(r50, tmp_path):
    sd = _random_torchvision_resnet()
    torch.save(sd, tmp_path / "resnet50-0676ba61.pth")
    DABDETRCheckpointer(r50).load(str(tmp_path / "resnet50-0676ba61.pth"))
    backbone = _backbone_state(r50)
    expected = {_tv_to_d2(k): v for k, v in sd.items() if not k.startswith("fc.") and "num_batches" not in k}
    assert expected.keys() == backbone.keys()  # every parameter and buffer of the backbone
    assert all(torch.equal(backbone[k], v) for k, v in expected.items())


def test_detectron2_torchvision_r50_pkl_loads_every_backbone_tensor(r50, tmp_path):
    # the format of Detectron2's ImageNetPretrained/torchvision/R-50.pkl (convert-torchvision-to-d2.py)
    sd = _random_torchvision_resnet(seed=1)
    weights = {_tv_to_d2(k): v.numpy() for k, v in sd.items()}
    with open(tmp_path / "R-50.pkl", "wb") as f:
        pickle.dump({"model": weights, "__author__": "torchvision", "matching_heuristics": True}, f)
    DABDETRCheckpointer(r50).load(str(tmp_path / "R-50.pkl"))
    backbone = _backbone_state(r50)
    loaded = [k for k in weights if k in backbone]
    assert set(loaded) == set(backbone)  # the file covers the whole backbone ...
    assert all(torch.equal(backbone[k], torch.from_numpy(weights[k])) for k in loaded)  # ... and all of it arrived


def _c2_name(d2_name: str) -> str:
    """Detectron2 ResNet name -> Caffe2 (MSRA R-50.pkl / R-101.pkl) name."""
    if d2_name.startswith("stem.conv1.norm."):
        return {"weight": "res_conv1_bn_s", "bias": "res_conv1_bn_b"}[d2_name.rsplit(".", 1)[1]]
    if d2_name == "stem.conv1.weight":
        return "conv1_w"
    m = re.match(r"res(\d)\.(\d+)\.(conv[123]|shortcut)\.(norm\.)?(weight|bias)$", d2_name)
    branch = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}[m.group(3)]
    suffix = ("_bn_s" if m.group(5) == "weight" else "_bn_b") if m.group(4) else "_w"
    return f"res{m.group(1)}_{m.group(2)}_{branch}{suffix}"


def test_msra_caffe2_r101_pkl_loads_every_backbone_weight(tmp_path):
    model = _model(101)
    g = torch.Generator().manual_seed(2)
    c2 = {}
    for k, v in _backbone_state(model).items():
        if not k.endswith(("running_mean", "running_var")):  # Caffe2 folds BN into scale and bias
            c2[_c2_name(k)] = (torch.randn(v.shape, generator=g) * 0.05).numpy()
    c2["fc1000_w"], c2["fc1000_b"] = torch.zeros(1000, 2048).numpy(), torch.zeros(1000).numpy()
    with open(tmp_path / "R-101.pkl", "wb") as f:
        pickle.dump(c2, f)
    DABDETRCheckpointer(model).load(str(tmp_path / "R-101.pkl"))
    backbone = _backbone_state(model)
    for k, v in backbone.items():
        if k.endswith(("running_mean", "running_var")):
            continue
        assert torch.equal(v, torch.from_numpy(c2[_c2_name(k)])), k


def test_checkpointer_refuses_unconverted_dab_detr_checkpoint(r50, tmp_path):
    torch.save(original_checkpoint(random_original_state_dict(seed=1)), tmp_path / "checkpoint.pth")
    with pytest.raises(CheckpointError, match=r"(?s)original layout.*tools/convert_checkpoint.py --source original"):
        DABDETRCheckpointer(r50).load(str(tmp_path / "checkpoint.pth"))
