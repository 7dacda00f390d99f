"""Every DAB-Deformable-DETR config instantiates, trains a step and evaluates on CPU."""
import pytest
import torch
from conditioning import FinitenessProbe, assert_finite_gradients, calibrate_frozen_batchnorm

from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances

CONFIGS = ["configs/dab_deformable_detr_r50.py", "configs/dab_deformable_detr_r50_two_stage.py",
           "configs/dn_dab_deformable_detr_r50.py"]


def _inputs():
    g = torch.Generator().manual_seed(0)
    inst = Instances((160, 192))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 120.0, 150.0]]))
    inst.gt_classes = torch.tensor([5])
    return [{"image": torch.rand(3, 160, 192, generator=g) * 255, "instances": inst}]


@pytest.mark.parametrize("path", CONFIGS)
def test_config_trains_a_step_and_evaluates(path):
    cfg = LazyConfig.load(path)
    assert cfg.model.select_box_nums_for_evaluation == 100
    assert cfg.model.criterion.weight_dict == {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    assert model.transformer.two_stage == path.endswith("two_stage.py")
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    calibrate_frozen_batchnorm(model, _inputs())  # a random frozen-BN ResNet does not normalize
    model.train()
    with FinitenessProbe(model) as probe:
        losses = model(_inputs())
        probe.assert_finite_forward()
        assert ("loss_class_enc" in losses) == model.transformer.two_stage
        assert ("loss_class_dn" in losses) == path.endswith("dn_dab_deformable_detr_r50.py")
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
    assert_finite_gradients(model, probe)
    optimizer.step()
    assert torch.isfinite(total)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        results = model([{"image": _inputs()[0]["image"]}])
    assert len(results[0]["instances"]) == 100
