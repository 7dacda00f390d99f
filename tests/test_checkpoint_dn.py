"""``tools/convert_checkpoint.py --source dn-detr``: DN-DETR's released files convert, load strictly
into the DN configs and evaluate.

The checkpoints are built from the key lists of DN-DETR's own models (tests/data/key_lists/dn_*,
copied from shared/spec-data: names and shapes of the state dicts its main.py saves), with
random values; what DN-DETR's main.py saves beside the weights (``args``) as in its command lines.
"""
import functools
import os

import pytest
import torch
from conftest import load_tool
from detectron2.config import LazyConfig, instantiate
from reference_models import COCO_IDS, original_checkpoint

from dab_detr.checkpoint import DABDETRCheckpointer, convert_checkpoint_file, convert_state_dict
from dab_detr.checkpoint.convert import convert_deformable_checkpoint
from dab_detr.checkpoint.safe_load import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
convert_main = load_tool("convert_checkpoint").main

# key list -> (DN-DETR's saved args, the config the converter must name)
RELEASES = {
    "dn_dab_detr_r50": ({}, "configs/dn_dab_detr_r50.py"),
    "dn_dab_detr_r50_dc5_3patterns": ({"dilation": True, "num_patterns": 3}, "configs/dn_dab_detr_r50_dc5_3patterns.py"),
    "dn_dab_deformable_detr_r50": ({}, "configs/dn_dab_deformable_detr_r50.py"),
}


def dn_state_dict(name):
    """Random tensors with the names and shapes of DN-DETR's ``name`` model; the box heads' alias
    ``transformer.decoder.bbox_embed`` holds the same values as ``bbox_embed`` (one module).
    Cached: callers get a new dict of shared tensors."""
    return dict(_dn_state_dict(name))


@functools.lru_cache(maxsize=3)
def _dn_state_dict(name):
    g = torch.Generator().manual_seed(0)
    sd = {}
    with open(os.path.join(REPO, "tests", "data", "key_lists", f"{name}_keys.txt")) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, shape = line.split(" ", 1)
            dims = [int(d) for d in shape.strip().strip("[]").split(",") if d.strip()]
            sd[key] = torch.rand(dims, generator=g) * 0.02 + (1.0 if key.endswith("running_var") else 0.0)
    for key in sd:
        if key.startswith("transformer.decoder.bbox_embed."):
            sd[key] = sd[key[len("transformer.decoder."):]].clone()
    return sd


def _eval_model(config, overrides=()):
    cfg = LazyConfig.apply_overrides(LazyConfig.load(os.path.join(REPO, config)), list(overrides))
    return instantiate(cfg.model)


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_dn_detr_checkpoint_converts_and_names_its_config(name, tmp_path, capsys):
    args, config = RELEASES[name]
    original = dn_state_dict(name)
    src = str(tmp_path / "checkpoint.pth")
    torch.save(original_checkpoint(original, **args), src)
    out = str(tmp_path / "converted.pth")
    assert convert_main(["--source", "dn-detr", src, out]) == 0
    printed = capsys.readouterr().out
    command = f"python tools/lazyconfig_train_net.py --config-file {config} --eval-only train.init_checkpoint={out}\n"
    assert command in printed
    assert "label_enc: kept the rows of the 80 COCO ids and the last ('unknown') row out of 92" in printed

    sd = torch.load(out, weights_only=True)["model"]
    # the 80 classes' rows and the "unknown" row, in Detectron2's class order
    assert torch.equal(sd["label_enc.weight"], original["label_enc.weight"][COCO_IDS + [91]])
    head = "class_embed.0" if "deformable" in name else "class_embed"
    assert torch.equal(sd[f"{head}.bias"], original[f"{head}.bias"][COCO_IDS])
    # exactly the model the named config builds
    with torch.device("meta"):
        model = _eval_model(config)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_converted_dn_detr_r50_loads_strictly_and_evaluates(tmp_path):
    src = str(tmp_path / "checkpoint.pth")
    torch.save(original_checkpoint(dn_state_dict("dn_dab_detr_r50")), src)
    out = str(tmp_path / "converted.pth")
    result = convert_checkpoint_file(src, out, "dn-detr")
    torch.manual_seed(0)
    model = _eval_model(result.config, result.overrides)
    DABDETRCheckpointer(model).load(out)
    for key, value in result.state_dict.items():
        assert torch.equal(model.state_dict()[key], value), key
    model.eval()
    with torch.no_grad():
        instances = model([{"image": torch.rand(3, 64, 80) * 255}])[0]["instances"]
    assert len(instances) == 300 and torch.isfinite(instances.pred_boxes.tensor).all()
    assert instances.pred_classes.max() < 80


def test_dn_detr_file_with_the_wrong_source_is_refused():
    with pytest.raises(CheckpointError, match="use --source dn-detr"):
        convert_state_dict(dn_state_dict("dn_dab_detr_r50"), "original")
    with pytest.raises(CheckpointError, match="use --source dn-detr"):
        convert_deformable_checkpoint(dn_state_dict("dn_dab_deformable_detr_r50"), "original", "checkpoint.pth")
    # and a DAB-DETR file is not a DN-DETR one
    plain = dn_state_dict("dn_dab_detr_r50")
    del plain["label_enc.weight"]
    with pytest.raises(CheckpointError, match="use --source original"):
        convert_state_dict(plain, "dn-detr")
