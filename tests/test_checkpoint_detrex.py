"""``--source detrex`` on every detrex DAB-DETR model, with checkpoints built from detrex's own key
lists (tests/data/key_lists, copied from shared/spec-data: the state-dict keys of detrex's
LazyConfigs at e244e6c, i.e. of its released files), random values.

Each checkpoint is converted with ``tools/convert_checkpoint.py``, which must print the matching
config; the converted file is loaded into the model that config (plus the printed overrides)
builds, and every decoder layer's logits and boxes must match an independent computation within
1e-4 relative error (for R50, R50-3patterns and R50-DC5, whose detrex files test_parity_hf.py
checks that way: the file must be, name for name and tensor for tensor, the one checked there). The reference is transformers' ``DabDetrForObjectDetection`` (configured as
the original, inverse-sigmoid eps 1e-3, 80 classes) loaded through the test's own detrex ->
original -> transformers renaming (reference_models.py), on two real photographs batched with
padding; for Swin-T its backbone is Detectron2's SwinTransformer (what detrex's config builds),
loaded with detrex's ``backbone.*`` tensors as they are.
"""
import os

import pytest
import torch
from conftest import REPO, load_tool
from detectron2.config import LazyConfig, instantiate
from reference_models import (DETREX_MODELS, detrex_to_original, hf_per_layer, hf_reference, original_shapes,
                              original_to_detrex, original_to_hf, padded_photo_batch, random_detrex_checkpoint,
                              read_key_list)

from dab_detr.checkpoint import DABDETRCheckpointer, convert_state_dict

pytest.importorskip("transformers")
pytest.importorskip("timm")

convert_main = load_tool("convert_checkpoint").main
RTOL = 1e-4
# test_parity_hf.py checks these three variants' detrex layout numerically at full size (and
# their original and transformers layouts); here they are checked to be those files, exactly
NUMERICALLY_CHECKED_IN_PARITY_HF = {"R50", "R50-3patterns", "R50-DC5"}
# detrex model -> the config the converter must print, and that config's image-PE temperature;
# detrex's plain DC5 file is the converted original R50-DC5, trained with temperature 10
EXPECTED = {
    "R50": ("configs/dab_detr_r50.py", 20),
    "R50-3patterns": ("configs/dab_detr_r50_3patterns.py", 20),
    "R50-DC5": ("configs/dab_detr_r50_dc5.py", 10),
    "R50-DC5-3patterns": ("configs/dab_detr_r50_dc5_3patterns.py", 20),
    "R101": ("configs/dab_detr_r101.py", 20),
    "Swin-T": ("configs/dab_detr_swin_t.py", 20),
}


@pytest.fixture(scope="module")
def batch():
    """Two photographs (160x160 and 128x224: multiples of 32, as the Swin backbone pads; small
    for CPU time), normalized and zero-padded into one batch, with the padding mask."""
    return padded_photo_batch(((160, 160), (128, 224)))


def _relative_error(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _assert_is_the_file_test_parity_hf_checks(detrex, converted, dc5):
    """The released detrex names are exactly those of the detrex files that test_parity_hf.py
    converts and checks layer by layer against the reference (``original_to_detrex``, for the
    same variant), and this file converts to exactly the tensors that the original layout of the
    same weights converts to; the conversion renames and reorders, whatever the values, so the
    numerical check there covers this file."""
    original = detrex_to_original(detrex)
    renamed = original_to_detrex(original, dc5=dc5)
    assert renamed.keys() == detrex.keys()
    assert all(torch.equal(renamed[k], v) for k, v in detrex.items())
    expected = convert_state_dict(original, "original").state_dict
    assert converted.keys() == expected.keys()
    differ = [k for k, v in expected.items() if not torch.equal(converted[k], v)]
    assert not differ, differ[:5]


def test_key_lists_are_detrex_released_files():
    """The test mapping detrex -> original reproduces the original's layout exactly (SPEC section 9,
    80 class rows), so the key lists and the reference's names agree key by key."""
    for model, (file_name, patterns, _dc5, depth) in DETREX_MODELS.items():
        header, shapes = read_key_list(file_name)
        assert "detrex projects/dab_detr/configs/" in header and "released as" in header
        assert "anchor_box_embed.weight" in shapes and shapes["anchor_box_embed.weight"] == (300, 4)
        if depth is None:
            continue
        names = detrex_to_original({k: torch.zeros(shape) for k, shape in shapes.items()})
        expected = dict(original_shapes(patterns, depth), **{"class_embed.weight": (80, 256), "class_embed.bias": (80,)})
        assert {k: tuple(v.shape) for k, v in names.items()} == expected, model


@pytest.mark.parametrize("model", list(DETREX_MODELS))
def test_detrex_checkpoint_converts_and_matches_reference(model, batch, original_eps, tmp_path, capsys):
    _, num_patterns, dc5, depth = DETREX_MODELS[model]
    config, temperature = EXPECTED[model]
    file_name, detrex = random_detrex_checkpoint(model)
    src = tmp_path / file_name
    torch.save({"model": detrex, "iteration": 375000}, src)  # detrex's checkpointer format
    out = tmp_path / "converted.pth"
    assert convert_main(["--source", "detrex", str(src), str(out)]) == 0
    printed = capsys.readouterr().out
    command = f"--config-file {config} --eval-only train.init_checkpoint={out}"
    assert command in printed, printed  # no overrides: the config alone reproduces the model
    overrides = printed.split(command, 1)[1].split("\n", 1)[0].split()
    assert overrides == []

    cfg = LazyConfig.apply_overrides(LazyConfig.load(os.path.join(REPO, config)), overrides)
    ours = instantiate(cfg.model).eval()
    DABDETRCheckpointer(ours).load(str(out))  # strict: any missing/unexpected/mis-shaped key raises
    if model in NUMERICALLY_CHECKED_IN_PARITY_HF:
        _assert_is_the_file_test_parity_hf_checks(detrex, torch.load(out, weights_only=True)["model"], dc5)
        return

    x, padding = batch
    with torch.no_grad():
        reference = hf_reference(num_patterns=num_patterns, dilation=dc5, temperature=temperature, num_labels=80,
                                 backbone=f"resnet{depth}" if depth else "swin_t")
        reference.load_state_dict(original_to_hf(detrex_to_original(detrex)), strict=True)
        ref_logits, ref_boxes = hf_per_layer(reference, x, padding)
    assert (ref_boxes[0] - ref_boxes[-1]).abs().max() > 1e-2  # the layers differ: each is a real check
    del reference

    with torch.no_grad():
        pred = ours.predict(x, padding)
    layers = pred["aux_outputs"] + [pred]
    logits = torch.stack([o["pred_logits"] for o in layers])
    boxes = torch.stack([o["pred_boxes"] for o in layers])
    assert logits.shape == ref_logits.shape == (6, 2, 300 * max(num_patterns, 1), 80)
    for layer in range(6):
        err_logits = _relative_error(logits[layer], ref_logits[layer])
        err_boxes = _relative_error(boxes[layer], ref_boxes[layer])
        assert err_logits < RTOL and err_boxes < RTOL, (model, layer, err_logits, err_boxes)
