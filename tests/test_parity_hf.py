"""Numerical parity with an independent implementation of the original DAB-DETR.

The reference is transformers' ``DabDetrForObjectDetection`` configured as the original (SPEC),
loaded with a random checkpoint that has exactly the original's names and shapes (through the
test's own original -> transformers renaming). The same checkpoint, written in the original,
transformers and detrex layouts, is converted with ``tools/convert_checkpoint.py``'s code and
loaded into our model with ``DABDETRCheckpointer``. Every decoder layer's class logits (the 80
COCO rows of the reference's 91) and boxes must agree to 1e-4 relative error, on two real
photographs of different sizes batched together (so padding masks are exercised too). The three
layouts must convert to bit-identical tensors, which the model holds exactly after each load, so one
forward of the model checks the three layouts.

One deliberate change to the reference: transformers clamps ``inverse_sigmoid`` at 1e-5, the
original at 1e-3 (SPEC section 4); the reference is run with the original's 1e-3.
"""
import pytest
import torch
from conftest import MODEL_CONFIG
from detectron2.config import LazyConfig, instantiate
from reference_models import (COCO_IDS, hf_per_layer, hf_reference, original_checkpoint, original_to_detrex,
                              original_to_hf, padded_photo_batch, random_original_state_dict)
from safetensors.torch import save_file

from dab_detr.checkpoint import DABDETRCheckpointer, convert_checkpoint_file

pytest.importorskip("transformers")
pytest.importorskip("timm")

RTOL = 1e-4
VARIANTS = {  # name: (num_patterns, DC5, image-PE temperature, config) as released (SPEC section 9)
    "R50": (0, False, 20, "configs/dab_detr_r50.py"),
    "R50-3patterns": (3, False, 20, "configs/dab_detr_r50_3patterns.py"),
    "R50-DC5": (0, True, 10, "configs/dab_detr_r50_dc5.py"),
}


@pytest.fixture(scope="module")
def batch():
    """Two photographs (384x384 and 300x448), normalized, zero-padded into one batch."""
    return padded_photo_batch(((384, 384), (300, 448)))


def _our_model(num_patterns, dc5, temperature):
    cfg = LazyConfig.load(MODEL_CONFIG).model
    cfg.transformer.num_patterns = num_patterns
    cfg.backbone.stages.res5_dilation = 2 if dc5 else 1
    cfg.position_embedding.temperature_h = cfg.position_embedding.temperature_w = temperature
    return instantiate(cfg).eval()


def _our_per_layer(model, x, padding):
    out = model.predict(x, padding)
    layers = out["aux_outputs"] + [{"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}]
    return torch.stack([o["pred_logits"] for o in layers]), torch.stack([o["pred_boxes"] for o in layers])


def _relative_error(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _write_layout(layout, sd, hf_model, folder, num_patterns, dc5, temperature):
    """The released checkpoint of ``layout`` holding weights ``sd``, as its publisher writes it."""
    folder.mkdir()
    if layout == "original":
        path = folder / "checkpoint.pth"
        torch.save(original_checkpoint(sd, num_patterns=num_patterns, dilation=dc5, pe_temperatureH=temperature,
                                       pe_temperatureW=temperature), path)
    elif layout == "hf":  # save_pretrained: safetensors without the tied copy, config.json beside it
        path = folder / "model.safetensors"
        weights = {k: v.contiguous() for k, v in hf_model.state_dict().items() if not k.startswith("model.decoder.bbox_embed.")}
        save_file(weights, str(path))
        hf_model.config.to_json_file(str(folder / "config.json"))
    else:
        path = folder / ("converted_dab_detr_r50_dc5.pth" if dc5 else "dab_detr_r50_50ep.pth")
        torch.save({"model": original_to_detrex(sd, dc5=dc5), "iteration": 100}, path)
    return str(path)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_per_layer_outputs_match_reference_for_every_layout(variant, batch, original_eps, tmp_path):
    num_patterns, dc5, temperature, config = VARIANTS[variant]
    x, padding = batch
    sd = random_original_state_dict(num_patterns=num_patterns, seed=7)
    with torch.no_grad():
        hf_model = hf_reference(num_patterns=num_patterns, dilation=dc5, temperature=temperature)
        hf_model.load_state_dict(original_to_hf(sd), strict=True)
        ref_logits, ref_boxes = hf_per_layer(hf_model, x, padding)
    ref_logits = ref_logits[..., COCO_IDS]
    queries = 300 * max(num_patterns, 1)
    assert ref_logits.shape == (6, 2, queries, 80) and ref_boxes.shape == (6, 2, queries, 4)
    # the layers differ from each other, so comparing every layer is a real check
    assert (ref_boxes[0] - ref_boxes[-1]).abs().max() > 1e-2

    model = _our_model(num_patterns, dc5, temperature)
    expected_keys = set(model.state_dict())
    converted = {}
    for layout in ("original", "hf", "detrex"):
        src = _write_layout(layout, sd, hf_model, tmp_path / layout, num_patterns, dc5, temperature)
        out = str(tmp_path / f"{layout}_converted.pth")
        result = convert_checkpoint_file(src, out, layout)
        assert result.config == config, layout
        converted[layout] = torch.load(out, weights_only=True)["model"]
        assert set(converted[layout]) == expected_keys, layout  # nothing missing, nothing unexpected
        for p in model.parameters():  # make sure the load below is what sets the weights
            p.data.fill_(0.5)
        DABDETRCheckpointer(model).load(out)
        # the loaded model holds exactly the converted tensors (its forward is a function of them)
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in converted[layout].items()), layout
    # the three layouts convert to the very same tensors, so the model that last loaded one of them
    # is, bit for bit, the model each of them loads: one forward checks all three
    for layout in ("hf", "detrex"):
        differ = [k for k, v in converted["original"].items() if not torch.equal(converted[layout][k], v)]
        assert not differ, (layout, differ[:5])
    with torch.no_grad():
        logits, boxes = _our_per_layer(model, x, padding)
    for layer in range(6):
        err_logits = _relative_error(logits[layer], ref_logits[layer])
        err_boxes = _relative_error(boxes[layer], ref_boxes[layer])
        assert err_logits < RTOL and err_boxes < RTOL, (variant, layer, err_logits, err_boxes)
