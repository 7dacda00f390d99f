"""tools/convert_checkpoint.py and dab_detr.checkpoint: layouts, variants, safe loading, errors.

Checkpoints are built here with exactly the key names and shapes of the released files (random
values); numerical parity of converted weights is in test_parity_hf.py.
"""
import argparse
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import load_tool, MODEL_CONFIG
from detectron2.config import LazyConfig, instantiate
from reference_models import (COCO_IDS, original_checkpoint, original_to_detrex, original_to_hf,
                              random_detrex_checkpoint, random_original_state_dict)
from safetensors.torch import save_file

from dab_detr.checkpoint import convert as convert_module
from dab_detr.checkpoint import (CheckpointError, DABDETRCheckpointer, UnsafeCheckpointError, Variant,
                                 convert_checkpoint_file, convert_state_dict, dabdetr_shapes, load_checkpoint_file)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


convert_main = load_tool("convert_checkpoint").main


@pytest.fixture(scope="module")
def original_sd():
    return random_original_state_dict(num_patterns=0, seed=1)


def _save(obj, path):
    torch.save(obj, path)
    return str(path)


def _convert_from_memory(monkeypatch, obj, path, source):
    """``convert_checkpoint_file`` as if ``path`` held ``obj``: every step but the file read (whose
    full-size round trip per layout is test_parity_hf.py's and test_checkpoint_detrex.py's)."""
    def read_in_memory(p):
        assert p == str(path)
        return obj

    monkeypatch.setattr(convert_module, "load_checkpoint_file", read_in_memory)
    return convert_checkpoint_file(str(path), None, source)


def _model_shapes(cfg):
    with torch.device("meta"):
        model = instantiate(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_expected_layout_is_exactly_the_models_state_dict():
    """The converter checks against dabdetr_shapes(); it must equal what the model really has."""
    cfg = LazyConfig.load(MODEL_CONFIG).model
    assert _model_shapes(cfg) == dabdetr_shapes(Variant("R50"))
    cfg.transformer.num_patterns = 3
    assert _model_shapes(cfg) == dabdetr_shapes(Variant("R50", num_patterns=3))
    cfg.transformer.num_patterns = 0
    cfg.backbone.stages.depth = 101
    assert _model_shapes(cfg) == dabdetr_shapes(Variant("R101"))
    cfg.backbone.stages.res5_dilation = 2  # DC5 has the same parameters
    assert _model_shapes(cfg) == dabdetr_shapes(Variant("R101"))


def test_detrex_swin_t_checkpoint_fits_the_swin_t_config():
    model = instantiate(LazyConfig.load(os.path.join(REPO, "configs/dab_detr_swin_t.py")).model)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == dabdetr_shapes(Variant("Swin-T"))
    # detrex's Swin-T file, from detrex's key list (only the last stage's output norm, norm3)
    file_name, detrex = random_detrex_checkpoint("Swin-T")
    result = convert_state_dict(detrex, "detrex", file_name=file_name)
    assert result.config == "configs/dab_detr_swin_t.py" and result.overrides == []
    assert {k: tuple(v.shape) for k, v in result.state_dict.items()} == ours
    assert torch.equal(result.state_dict["backbone.norm3.weight"], detrex["backbone.norm3.weight"])


# every config the converter names (the model-zoo table's rows) and what it must reproduce
ZOO = {
    "configs/dab_detr_r50.py": dict(depth=50, patterns=0, dilation=1, temperature=20),
    "configs/dab_detr_r50_3patterns.py": dict(depth=50, patterns=3, dilation=1, temperature=20),
    "configs/dab_detr_r50_dc5.py": dict(depth=50, patterns=0, dilation=2, temperature=10),
    "configs/dab_detr_r50_dc5_fixxy.py": dict(depth=50, patterns=0, dilation=2, temperature=20),
    "configs/dab_detr_r50_dc5_3patterns.py": dict(depth=50, patterns=3, dilation=2, temperature=20),
    "configs/dab_detr_r101.py": dict(depth=101, patterns=0, dilation=1, temperature=20),
}


@pytest.mark.parametrize("config", list(ZOO))
def test_model_zoo_configs_reproduce_the_released_settings(config):
    want = ZOO[config]
    model = LazyConfig.load(os.path.join(REPO, config)).model
    assert model.backbone.stages.depth == want["depth"]
    assert model.backbone.stages.res5_dilation == want["dilation"]
    assert model.transformer.num_patterns == want["patterns"]
    assert model.position_embedding.temperature_h == model.position_embedding.temperature_w == want["temperature"]
    assert model.num_classes == 80 and model.num_queries == 300
    variant = Variant(f"R{want['depth']}", num_patterns=want["patterns"])
    assert _model_shapes(model) == dabdetr_shapes(variant)


def test_original_checkpoint_converts_with_cli(original_sd, tmp_path, capsys):
    src = _save(original_checkpoint(original_sd, dilation=True, pe_temperatureH=10, pe_temperatureW=10),
                tmp_path / "checkpoint.pth")
    out = str(tmp_path / "converted.pth")
    assert convert_main(["--source", "original", src, out]) == 0
    printed = capsys.readouterr().out
    # the saved arguments say DC5 with temperature 10: the plain R50-DC5 model
    assert "configs/dab_detr_r50_dc5.py" in printed and "0 patterns" in printed

    converted = torch.load(out, weights_only=True)
    assert converted["matching_heuristics"] is False
    sd = converted["model"]
    assert {k: tuple(v.shape) for k, v in sd.items()} == dabdetr_shapes(Variant("R50"))
    # spot checks of each kind of renaming
    assert torch.equal(sd["class_embed.weight"], original_sd["class_embed.weight"][COCO_IDS])
    assert torch.equal(sd["class_embed.bias"], original_sd["class_embed.bias"][COCO_IDS])
    assert torch.equal(sd["backbone.stem.conv1.norm.running_var"], original_sd["backbone.0.body.bn1.running_var"])
    assert torch.equal(sd["backbone.res3.0.shortcut.norm.weight"],
                       original_sd["backbone.0.body.layer2.0.downsample.1.weight"])
    assert torch.equal(sd["backbone.res5.2.conv3.weight"], original_sd["backbone.0.body.layer4.2.conv3.weight"])
    for k in ("transformer.encoder.layers.3.self_attn.in_proj_weight", "transformer.decoder.layers.0.ca_qpos_proj.bias",
              "bbox_embed.layers.2.weight", "refpoint_embed.weight"):
        assert torch.equal(sd[k], original_sd[k])
    assert not any(k.startswith("transformer.decoder.bbox_embed") for k in sd)


@pytest.mark.parametrize("args, file_name, config", [
    ({}, "checkpoint.pth", "configs/dab_detr_r50.py"),
    ({"num_patterns": 3}, "checkpoint.pth", "configs/dab_detr_r50_3patterns.py"),
    ({"dilation": True, "random_refpoints_xy": True}, "checkpoint.pth", "configs/dab_detr_r50_dc5_fixxy.py"),
    ({"dilation": True, "num_patterns": 3}, "checkpoint.pth", "configs/dab_detr_r50_dc5_3patterns.py"),
    (None, "DAB_DETR_R50_DC5_checkpoint.pth", "configs/dab_detr_r50_dc5.py"),  # no args: file name
])
def test_config_suggestion(args, file_name, config, tmp_path, monkeypatch):
    sd = random_original_state_dict(num_patterns=(args or {}).get("num_patterns", 0), seed=1)
    ckpt = original_checkpoint(sd, **(args or {}))
    if args is None:
        del ckpt["args"]
    result = _convert_from_memory(monkeypatch, ckpt, tmp_path / file_name, "original")
    assert result.config == config


def test_hf_safetensors_with_and_without_tied_copy(original_sd, tmp_path, monkeypatch):
    reference = convert_state_dict(original_sd, "original").state_dict
    hf = original_to_hf(original_sd)
    # as DabDetrForObjectDetection.state_dict() (tied copy included) and as save_pretrained (without)
    without_copy = {k: v for k, v in hf.items() if not k.startswith("model.decoder.bbox_embed.")}
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "config.json").write_text('{"dilation": true, "temperature_height": 10, "temperature_width": 10}')
    # one real file (test_parity_hf.py reads save_pretrained's file too), the other in memory
    save_file({k: v.contiguous() for k, v in hf.items()}, str(folder / "model.safetensors"))
    results = [convert_checkpoint_file(str(folder / "model.safetensors"), None, "hf"),
               _convert_from_memory(monkeypatch, without_copy, folder / "model.safetensors", "hf")]
    for result in results:
        assert result.config == "configs/dab_detr_r50_dc5.py"  # read from config.json
        assert result.state_dict.keys() == reference.keys()
        assert all(torch.equal(result.state_dict[k], reference[k]) for k in reference)
    # pytorch_model.bin of the first transformers release: decoder layers grouped as layer.0/1/2
    old = {k.replace(".self_attn.self_attn", ".layer.0.self_attn").replace(".cross_attn.cross_attn", ".layer.1.cross_attn")
            .replace(".mlp.", ".layer.2."): v for k, v in without_copy.items()}
    assert any(".layer.1.cross_attn_query_pos_sine_proj" in k for k in old)
    result = _convert_from_memory(monkeypatch, old, tmp_path / "pytorch_model.bin", "hf")
    assert all(torch.equal(result.state_dict[k], reference[k]) for k in reference)


def test_detrex_layout_converts_to_the_same_weights(original_sd, tmp_path, monkeypatch):
    reference = convert_state_dict(original_sd, "original").state_dict
    for dc5, name, config in ((False, "dab_detr_r50_50ep.pth", "configs/dab_detr_r50.py"),
                              (True, "converted_dab_detr_r50_dc5.pth", "configs/dab_detr_r50_dc5.py")):
        detrex = original_to_detrex(original_sd, dc5=dc5)  # detrex's real names (checked against its key list)
        assert ("anchor_box_embed.weight" in detrex) and (any(k.startswith("backbone.body.") for k in detrex) == dc5)
        ckpt = {"model": detrex, "trainer": {"iteration": 10}, "iteration": 10}
        result = _convert_from_memory(monkeypatch, ckpt, tmp_path / name, "detrex")  # files: test_checkpoint_detrex
        assert result.config == config and result.variant.dilation == dc5
        assert result.state_dict.keys() == reference.keys()
        assert all(torch.equal(result.state_dict[k], reference[k]) for k in reference)


def test_evaluation_command_carries_saved_settings_of_plain_r50(original_sd, tmp_path, capsys):
    """A plain (not DC5) original R50 trained with image-PE temperature 10: the config plus overrides."""
    src = _save(original_checkpoint(original_sd, pe_temperatureH=10, pe_temperatureW=10), tmp_path / "checkpoint.pth")
    out = str(tmp_path / "converted.pth")
    assert convert_main(["--source", "original", src, out]) == 0
    assert (f"python tools/lazyconfig_train_net.py --config-file configs/dab_detr_r50.py --eval-only "
            f"train.init_checkpoint={out} model.position_embedding.temperature_h=10 "
            f"model.position_embedding.temperature_w=10\n") in capsys.readouterr().out


def _original_deformable_state_dict(num_patterns):
    """Zeros with the original DAB-Deformable-DETR's 604 keys (shared/spec-data list), plus the
    pattern embeddings the original registers with --num_patterns."""
    sd = {}
    with open(os.path.join(REPO, "tests", "data", "key_lists", "dab_deformable_detr_keys.txt")) as f:
        for line in (line for line in f if "\t" in line):  # the last line is a "# keys: ..." summary
            name, shape, _ = line.rstrip("\n").split("\t")
            sd[name] = torch.zeros([int(d) for d in shape.strip("[]").split(",") if d.strip()])
    if num_patterns:
        sd["patterns_embed.weight"] = torch.zeros(num_patterns, 256)
    return sd


def test_evaluation_command_carries_deformable_dilation_and_patterns(tmp_path, capsys):
    sd = _original_deformable_state_dict(num_patterns=3)
    src = _save(original_checkpoint(sd, dilation=True, num_patterns=3), tmp_path / "checkpoint0049.pth")
    out = str(tmp_path / "converted.pth")
    assert convert_main(["--source", "original", src, out]) == 0
    assert (f"--config-file configs/dab_deformable_detr_r50.py --eval-only train.init_checkpoint={out} "
            f"model.num_patterns=3 model.backbone.stages.res5_dilation=2\n") in capsys.readouterr().out
    # without saved arguments: nothing to override
    ckpt = original_checkpoint(_original_deformable_state_dict(0))
    del ckpt["args"]
    result = convert_checkpoint_file(_save(ckpt, tmp_path / "v2.pth"), None, "original")
    assert result.config == "configs/dab_deformable_detr_r50.py" and result.overrides == []


def test_three_pattern_checkpoint_is_detected(tmp_path):
    sd = random_original_state_dict(num_patterns=3, seed=1)
    result = convert_state_dict(sd, "original")
    assert result.variant.num_patterns == 3 and result.state_dict["transformer.patterns.weight"].shape == (3, 256)


# ----------------------------------------------------------------------------- failures
def _convert_error(sd, source="original"):
    with pytest.raises(CheckpointError) as e:
        convert_state_dict(sd, source, file_name="bad.pth")
    return str(e.value)


def test_missing_key_is_named(original_sd):
    sd = dict(original_sd)
    del sd["transformer.decoder.layers.4.ca_kpos_proj.weight"]
    msg = _convert_error(sd)
    assert "1 missing key" in msg and "transformer.decoder.layers.4.ca_kpos_proj.weight" in msg


def test_extra_key_is_named(original_sd):
    sd = dict(original_sd, **{"transformer.decoder.layers.3.ca_qpos_proj.weight": torch.zeros(256, 256)})
    msg = _convert_error(sd)
    assert "unmapped" in msg and "transformer.decoder.layers.3.ca_qpos_proj.weight" in msg
    sd = dict(original_sd, **{"backbone.0.body.fc.weight": torch.zeros(1000, 2048)})
    assert "backbone.0.body.fc.weight" in _convert_error(sd)


def test_shape_mismatch_is_named(original_sd):
    sd = dict(original_sd, **{"input_proj.weight": torch.zeros(256, 1024, 1, 1)})
    msg = _convert_error(sd)
    assert "shape mismatch" in msg and "input_proj.weight" in msg and "(256, 1024, 1, 1)" in msg
    sd = dict(original_sd, **{"class_embed.weight": torch.zeros(20, 256), "class_embed.bias": torch.zeros(20)})
    assert "class_embed.weight has 20 rows" in _convert_error(sd)


def test_copies_that_differ_are_refused(original_sd):
    sd = dict(original_sd)
    sd["transformer.decoder.bbox_embed.layers.0.bias"] = sd["bbox_embed.layers.0.bias"] + 1
    msg = _convert_error(sd)
    assert "transformer.decoder.bbox_embed.layers.0.bias" in msg and "differ" in msg


def test_wrong_source_is_refused(original_sd):
    msg = _convert_error(original_sd, source="hf")
    assert "original layout" in msg and "--source original" in msg
    ours = convert_state_dict(original_sd, "original").state_dict
    assert "already in this project's layout" in _convert_error(ours, source="detrex")


class _NotAllowed:
    """A class a checkpoint must not be allowed to instantiate."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_pickled_object_that_is_not_allowed_is_refused(tmp_path, capsys):
    # the refusal happens while unpickling, before any weight is read: a few-KB file carries it
    ckpt = original_checkpoint({"input_proj.weight": torch.zeros(4, 2, 1, 1)})
    ckpt["args"] = _NotAllowed()
    path = _save(ckpt, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError) as e:
        convert_checkpoint_file(path, None, "original")
    assert "evil.pth" in str(e.value) and "system" in str(e.value) and "not allowed" in str(e.value)
    # the tool fails for that reason (not for the missing weights, which it never reached): one message, exit 1
    with pytest.raises(SystemExit, match=r"^error: refusing to load .*evil.pth.*not allowed"):
        convert_main(["--source", "original", path, str(tmp_path / "out.pth")])
    assert not (tmp_path / "out.pth").exists()
    # the same for Detectron2's .pkl format (read with a numpy-only unpickler)
    with open(tmp_path / "R-50.pkl", "wb") as f:
        pickle.dump({"model": {"conv1_w": np.zeros(3)}, "x": _NotAllowed()}, f)
    model = torch.nn.Linear(1, 1)
    with pytest.raises(UnsafeCheckpointError, match=r"R-50.pkl.*posix.system|R-50.pkl.*nt.system"):
        DABDETRCheckpointer(model).load(str(tmp_path / "R-50.pkl"))


def test_argparse_namespace_is_the_allowed_extra(tmp_path):
    # a few-KB file: what is checked is that the safe reader gives the Namespace back, intact (the
    # full-size files with their Namespace are converted by the tests above)
    ckpt = original_checkpoint({"input_proj.weight": torch.zeros(4, 2, 1, 1)}, dilation=True, num_patterns=3)
    assert isinstance(ckpt["args"], argparse.Namespace)
    loaded = load_checkpoint_file(_save(ckpt, tmp_path / "ok.pth"))
    assert isinstance(loaded["args"], argparse.Namespace) and vars(loaded["args"]) == vars(ckpt["args"])
    assert torch.equal(loaded["model"]["input_proj.weight"], ckpt["model"]["input_proj.weight"])


def test_unreadable_inputs_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth does not exist"):
        convert_checkpoint_file(str(tmp_path / "nope.pth"), None, "original")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth is not a readable checkpoint file"):
        convert_checkpoint_file(str(tmp_path / "garbage.pth"), None, "original")
    with pytest.raises(CheckpointError, match="weights under 'model'"):
        convert_checkpoint_file(_save({"state_dict": {}}, tmp_path / "x.pth"), None, "original")
    with pytest.raises(CheckpointError, match="not tensors"):
        convert_state_dict({"input_proj.weight": [1, 2]}, "original")


def test_config_check_of_the_converter(original_sd, tmp_path, capsys):
    """``--config``: the converted weights against the model that config builds (meta device), with
    the checkpoint-fit message when they do not fit; nothing is written then."""
    src = _save(original_checkpoint(original_sd), tmp_path / "checkpoint.pth")
    out = tmp_path / "converted.pth"
    assert convert_main(["--source", "original", src, str(out), "--config", "configs/dab_detr_r50.py"]) == 0
    assert out.is_file()
    capsys.readouterr()
    wrong = tmp_path / "wrong.pth"
    with pytest.raises(SystemExit) as e:
        convert_main(["--source", "original", src, str(wrong), "--config", "configs/dab_detr_r101.py"])
    message = str(e.value.code)
    assert message.startswith("error: checkpoint (converted) does not fit the model of configs/dab_detr_r101.py")
    assert "255 missing key(s)" in message and "backbone.res4.10.conv1.weight" in message, message
    assert "R50 vs R101" in message and not wrong.exists()
