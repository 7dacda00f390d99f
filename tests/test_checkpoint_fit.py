"""A checkpoint that does not fit the model is refused with one error (DABDETRCheckpointer), and
``--eval-only`` exits non-zero naming the checkpoint, the mismatched keys and the fix; ImageNet
backbone files still load into the backbone only; ``?reinit_class_head=True`` lets a fine-tuning
user load a checkpoint with another class count."""
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from conftest import REPO, small_model_config
from detectron2.config import LazyConfig, instantiate

from dab_detr.checkpoint import CheckpointError, DABDETRCheckpointer


def _eval_only(config, checkpoint, tmp_path, *overrides):
    cmd = [sys.executable, os.path.join(REPO, "tools", "lazyconfig_train_net.py"), "--config-file", config,
           "--eval-only", f"train.init_checkpoint={checkpoint}", f"train.output_dir={tmp_path / 'out'}",
           *overrides]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout + done.stderr


def _zeros_state_dict(config, **model_overrides):
    """The state dict (zeros) of the model ``config`` builds with ``model_overrides``: a checkpoint
    of this project for that model (built on the meta device: no time, no memory)."""
    cfg = LazyConfig.load(os.path.join(REPO, config))
    cfg.model.update(model_overrides)
    with torch.device("meta"):
        model = instantiate(cfg.model)
    return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}


def test_eval_only_refuses_a_torchvision_resnet18_file(tmp_path):
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    rc, out = _eval_only("configs/dab_detr_r50.py", path, tmp_path)
    assert rc != 0
    assert f"checkpoint {path} does not fit the DABDETR" in out
    assert "backbone.res2.0.conv1.weight: checkpoint (64, 64, 3, 3), model (64, 64, 1, 1)" in out
    assert "missing key(s)" in out and "backbone.res2.0.conv3.weight" in out
    assert "backbone-only (ImageNet) file whose backbone is not the one the config builds" in out
    assert "Traceback" not in out  # the error, not a traceback


def test_eval_only_refuses_own_checkpoint_with_other_num_queries(tmp_path):
    path = tmp_path / "model_final.pth"
    torch.save({"model": _zeros_state_dict("configs/dab_detr_demo.py", num_queries=12), "iteration": 9},
               path)
    rc, out = _eval_only("configs/dab_detr_demo.py", path, tmp_path)
    assert rc != 0
    assert f"checkpoint {path} does not fit" in out
    assert "refpoint_embed.weight: checkpoint (12, 4), model (20, 4)" in out
    assert "the checkpoint has 12 anchors (queries), the config builds 20: add model.num_queries=12" in out


def test_eval_only_refuses_deformable_patterns_without_num_patterns(tmp_path):
    path = tmp_path / "dab_deformable_detr_3patterns_converted.pth"
    torch.save({"model": _zeros_state_dict("configs/dab_deformable_detr_r50.py", num_patterns=3),
                "matching_heuristics": False}, path)
    rc, out = _eval_only("configs/dab_deformable_detr_r50.py", path, tmp_path)
    assert rc != 0
    assert f"checkpoint {path} does not fit the DABDeformableDETR" in out
    assert "1 unexpected key(s)" in out and "patterns_embed.weight" in out
    assert "the checkpoint has 3 pattern embeddings (patterns_embed.weight), the config has none: " \
           "add model.num_patterns=3" in out


# ----------------------------------------------------------------------------- in-process
def _small(**overrides):
    torch.manual_seed(0)
    return instantiate(small_model_config(**overrides)).eval()


def test_nothing_is_loaded_when_a_key_is_missing(tmp_path):
    source = _small()
    sd = source.state_dict()
    del sd["transformer.decoder.layers.1.ca_v_proj.bias"]
    torch.save({"model": sd}, tmp_path / "partial.pth")
    target = _small(num_classes=5)
    with torch.no_grad():
        for p in target.parameters():
            p.fill_(0.5)
    with pytest.raises(CheckpointError) as e:
        DABDETRCheckpointer(target).load(str(tmp_path / "partial.pth"))
    msg = str(e.value)
    assert "partial.pth" in msg and "1 missing key(s)" in msg and "transformer.decoder.layers.1.ca_v_proj.bias" in msg
    assert "another model or backbone" in msg
    assert all(torch.all(p == 0.5) for p in target.parameters())  # refused before anything was loaded


def test_class_count_switch_reinitializes_only_the_class_head(tmp_path):
    source = _small(num_classes=5)
    torch.save({"model": source.state_dict()}, tmp_path / "five_classes.pth")
    target = _small(num_classes=3)
    fresh_class = target.class_embed.weight.detach().clone()
    with pytest.raises(CheckpointError) as e:
        DABDETRCheckpointer(target).load(str(tmp_path / "five_classes.pth"))
    msg = str(e.value)
    assert "class_embed.weight: checkpoint (5, 64), model (3, 64)" in msg
    assert "add model.num_classes=5" in msg and "five_classes.pth?reinit_class_head=True" in msg

    DABDETRCheckpointer(target).load(str(tmp_path / "five_classes.pth") + "?reinit_class_head=True")
    loaded, src = target.state_dict(), source.state_dict()
    assert torch.equal(loaded["class_embed.weight"], fresh_class)
    assert all(torch.equal(loaded[k], src[k]) for k in src if not k.startswith("class_embed."))
    with pytest.raises(CheckpointError, match="reinit_class_head must be True or False"):
        DABDETRCheckpointer(target).load(str(tmp_path / "five_classes.pth") + "?reinit_class_head=yes")
    # the switch does not hide other differences
    with pytest.raises(CheckpointError, match="refpoint_embed.weight"):
        DABDETRCheckpointer(_small(num_classes=3, num_queries=7)).load(
            str(tmp_path / "five_classes.pth") + "?reinit_class_head=True")
