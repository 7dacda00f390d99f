"""tools/visualize.py pictures on a tiny model, and the attention capture behind them."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import load_tool, make_inputs
from detectron2.utils.events import EventStorage, JSONWriter
from PIL import Image

from dab_detr import Predictor
from dab_detr.decoder_inspection import attention_logits, capture_cross_attention, positional_attention
from test_predictor import (  # noqa: F401 (forget_demo_datasets: an autouse fixture)
    DEMO_CONFIG, SMALL, forget_demo_datasets, random_image, save_random_checkpoint, small_config)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("visualize")
    image = root / "image.png"
    Image.fromarray(random_image(120, 150, 0)).save(image)
    return {
        "root": root, "image": str(image),
        "plain": save_random_checkpoint(small_config(), str(root / "plain" / "model.pth")),
        "patterns": save_random_checkpoint(small_config(["model.transformer.num_patterns=3"]),
                                           str(root / "patterns" / "model.pth")),
    }


def visualize(*args):
    return load_tool("visualize").main(list(args))


def png_size(path):
    with Image.open(path) as image:
        image.load()
        return image.size


def model_args(setup, name="plain", patterns=False):
    overrides = SMALL + (["model.transformer.num_patterns=3"] if patterns else [])
    return ["--config-file", DEMO_CONFIG, "--device", "cpu", *overrides, f"train.init_checkpoint={setup[name]}"]


def test_anchor_layer_and_attention_pictures(setup, tmp_path):
    path = visualize("anchors", "--output", str(tmp_path / "anchors.png"), *model_args(setup))
    width, height = png_size(path)
    assert 250 < width < 700 and 250 < height < 700  # one square panel
    path = visualize("anchors", "--output", str(tmp_path / "anchors3.png"), *model_args(setup, "patterns", True))
    assert png_size(path)[0] > 250

    one = png_size(visualize("layers", setup["image"], "--top-k", "1", "--output", str(tmp_path / "l1.png"),
                             *model_args(setup)))
    three = png_size(visualize("layers", setup["image"], "--top-k", "3", "--output", str(tmp_path / "l3.png"),
                               *model_args(setup)))
    assert three[0] > 2 * one[0] and 150 < three[1] < 600  # one panel per detection, side by side

    path = visualize("attention", setup["image"], "--queries", "0", "5", "--layer", "1", "--output",
                     str(tmp_path / "attention.png"), *model_args(setup))
    width, height = png_size(path)
    assert 400 < width < 1000 and height > 1.3 * (width / 2)  # 2 queries x (on, off)
    path = visualize("attention", setup["image"], "--temperature", "2", "--head", "3", "--output",
                     str(tmp_path / "attention_t2.png"), *model_args(setup))
    assert png_size(path)[1] > png_size(str(tmp_path / "attention.png"))[1]  # 3 top detections

    with pytest.raises(SystemExit, match="--head 9: the model has 8 heads"):
        visualize("attention", setup["image"], "--head", "9", *model_args(setup))
    with pytest.raises(ValueError, match=r"query indices \[99\] do not exist: the model has 20"):
        visualize("attention", setup["image"], "--queries", "99", *model_args(setup))
    with pytest.raises(ValueError, match="decoder layer 7 does not exist"):
        visualize("attention", setup["image"], "--layer", "7", *model_args(setup))


def test_positional_attention_comes_from_the_model(setup):
    predictor = Predictor(DEMO_CONFIG, setup["plain"], overrides=SMALL, device="cpu")
    image = np.asarray(Image.open(setup["image"]))
    model = predictor.model
    for layer in range(len(model.transformer.decoder.layers)):
        with capture_cross_attention(model, layer) as record:
            predictor(image, array_format="RGB")
        heads = record["num_heads"]
        q, k, v = record["query"], record["key"], record["value"]
        # the captured queries and keys reproduce the module's own output: full softmax attention
        # over the captured inputs, then its output projection
        scale = (q.shape[-1] / heads) ** -0.5
        weights = attention_logits(q, k, heads, scale, record["key_padding_mask"]).softmax(-1)
        values = v.view(v.shape[0], v.shape[1], heads, -1).transpose(1, 2)
        out = model.transformer.decoder.layers[layer].cross_attn.out_proj((weights @ values).transpose(1, 2).flatten(2))
        torch.testing.assert_close(out, record["output"], atol=1e-5, rtol=1e-4)
        # the positional query / key are the second half of each head of the attention's query / key
        half = q.shape[-1] // heads // 2
        for full, positional in ((q, record["query_pos"]), (k, record["key_pos"])):
            split = full.view(*full.shape[:2], heads, 2 * half)[..., half:]
            torch.testing.assert_close(split, positional.view(*positional.shape[:2], heads, half))

    on = positional_attention(predictor, image, layer=1, queries=[0, 3, 7])
    off = positional_attention(predictor, image, layer=1, queries=[0, 3, 7], modulation=False)
    hot = positional_attention(predictor, image, layer=1, queries=[0, 3, 7], temperature=2.0)
    feature_h, feature_w = on["feature_size"]
    for result in (on, off, hot):
        assert result["maps"].shape == (3, 8, feature_h, feature_w)
        torch.testing.assert_close(result["maps"].sum(dim=(-1, -2)), torch.ones(3, 8))  # softmax over the image
        assert (result["maps"] >= 0).all()
    assert (on["maps"] - off["maps"]).abs().max() > 1e-3  # the modulation changes the maps
    assert (on["maps"] - hot["maps"]).abs().max() > 1e-3
    # the model is left as it was: modulation and temperature restored
    assert model.transformer.decoder.ref_anchor_head is not None
    assert model.position_embedding.temperature_h == 20.0
    torch.testing.assert_close(positional_attention(predictor, image, layer=1, queries=[0, 3, 7])["maps"], on["maps"])


def test_curves_from_metrics_json(setup, tmp_path):
    """A metrics.json written by Detectron2's JSONWriter with the losses our model returns."""
    torch.manual_seed(0)
    from detectron2.config import instantiate

    model = instantiate(small_config().model).train()
    losses = model(make_inputs([(64, 80), (72, 64)], num_classes=4))
    metrics = tmp_path / "metrics.json"
    with EventStorage(0) as storage:
        writer = JSONWriter(str(metrics))
        for iteration in range(1, 21):
            storage.iter = iteration
            scale = 1.0 / iteration
            storage.put_scalars(total_loss=scale * float(sum(losses.values())),
                                **{k: scale * float(v) for k, v in losses.items()})
            if iteration % 10 == 0:
                storage.put_scalar("bbox/AP", 2.0 * iteration)
            writer.write()
        writer.close()
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert {"loss_class", "loss_bbox", "loss_giou", "total_loss"} <= set(rows[0])
    path = visualize("curves", str(metrics), "--output", str(tmp_path / "curves.png"))
    width, height = png_size(path)
    assert 800 < width < 1300 and 200 < height < 450  # three panels side by side

    (tmp_path / "bad.json").write_text('{"iteration": 1}\n')
    with pytest.raises(SystemExit, match="no training losses"):
        visualize("curves", str(tmp_path / "bad.json"))
    with pytest.raises(SystemExit, match="metrics file .*nope.json does not exist"):
        visualize("curves", str(tmp_path / "nope.json"))
    assert os.path.getsize(path) > 0


def test_layer_boxes_are_the_predictors_detections(setup, tmp_path, monkeypatch):
    """The pictures show what the predictor detects: the last layer's top query of
    ``decoder_layer_boxes`` is the predictor's top detection (same score, class and box), and
    ``tools/visualize.py`` hands the model the image in the model's own channel order."""
    from dab_detr.decoder_inspection import decoder_layer_boxes, positional_attention

    predictor = Predictor(DEMO_CONFIG, setup["plain"], overrides=SMALL, device="cpu")
    top = predictor(setup["image"])["instances"][0]
    result = decoder_layer_boxes(predictor, setup["image"], top_k=1)
    torch.testing.assert_close(result["scores"][0], top.scores[0], atol=1e-6, rtol=0)
    assert int(result["classes"][0]) == int(top.pred_classes[0])
    torch.testing.assert_close(result["boxes"][-1, 0], top.pred_boxes.tensor[0], atol=1e-3, rtol=0)

    tool = load_tool("visualize")
    seen = []

    def record(function):
        def wrapper(predictor, image, **kwargs):
            seen.append(image)
            return function(predictor, image, **kwargs)
        return wrapper

    monkeypatch.setattr(tool, "decoder_layer_boxes", record(decoder_layer_boxes))
    monkeypatch.setattr(tool, "positional_attention", record(positional_attention))
    tool.main(["layers", setup["image"], "--top-k", "1", "--output", str(tmp_path / "l.png"), *model_args(setup)])
    tool.main(["attention", setup["image"], "--top-k", "1", "--output", str(tmp_path / "a.png"), *model_args(setup)])
    assert len(seen) == 3
    for image in seen:  # what the tool gave the model is, for the model, the file itself
        torch.testing.assert_close(predictor(image)["instances"].scores, predictor(setup["image"])["instances"].scores)
