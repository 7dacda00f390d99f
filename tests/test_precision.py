"""The precision setting (dab_detr/precision.py): names, ``auto``, errors, and that it reaches the
Predictor, tools/predict.py, --eval-only and training; bf16 detections stay close to fp32.

What needed fp32, measured (2026-12-03, this CPU: no native bf16, so bf16 is emulated; drift =
|bf16 autocast - fp32| per decoder layer, on the queries scoring > 0.3 in fp32):

- DAB-DETR demo checkpoint (iteration 3000 of configs/dab_detr_demo.py, 24 dab_demo_val images,
  224 px wide): plain autocast moved boxes by 0.7 px mean / 3.7 px max and scores by 0.011 mean /
  0.08 max, growing from layer 0 to 5. The heads in fp32 alone changed nothing (0.66 px); the
  decoder's positional MLPs, self-attention or FFN in fp32 changed nothing either (0.61-0.66 px).
  The cross-attention in fp32 (its projections and the attention) cut it to 0.15 px mean /
  0.6 px max and scores to 0.0025 mean / 0.026 max (the attention alone: 0.30 px; the
  projections alone: 0.65 px). So the cross-attention and the heads run in fp32.
- DAB-Deformable-DETR R50, random weights, two photos (384x384, 300x448): the box heads in fp32
  cut the box drift from 0.9 px max to 0.1-0.3 px per layer (448 px wide); scores 0.002-0.005 max either
  way. The deformable sampling is fp32 under CPU autocast already (grid_sample is an fp32 op).
- Anchors, their sigmoid / inverse sigmoid, the sine embeddings and the box decoding are fp32
  without casts (fp32 parameters; a bf16 head output added to an fp32 anchor logit is fp32).

The bounds below are those numbers with a margin for the random tiny models used here.
"""

import pytest
import torch
from conftest import load_tool, make_inputs, small_model_config
from detectron2.config import instantiate
from detectron2.utils.events import EventStorage
from omegaconf import OmegaConf

from dab_detr import precision as precision_module
from dab_detr.config_checks import ConfigError, check_config
from dab_detr.engine import DETRTrainLoop, LazyConfigTrainer
from dab_detr.engine.trainer import training_precision
from dab_detr.precision import PrecisionError, parse_precision, resolve_precision, run_in_fp32
from dab_detr.predictor import Predictor

DEMO_CONFIG = "configs/dab_detr_demo.py"


# ----------------------------------------------------------------------------- the setting
def test_names_and_aliases():
    assert [parse_precision(n) for n in ("fp32", "BF16", "bfloat16", "float16", "auto", None)] == \
        ["fp32", "bf16", "bf16", "fp16", "auto", "fp32"]
    with pytest.raises(PrecisionError, match=r"train.precision='int8' is not a precision; use one of fp32, bf16"):
        parse_precision("int8", "train.precision")


def test_fp16_on_cpu_is_a_clear_error():
    with pytest.raises(PrecisionError, match="train.precision=fp16 needs a CUDA device"):
        resolve_precision("fp16", "cpu", "train.precision")


@pytest.mark.parametrize("native, expected", [(False, "fp32"), (True, "bf16")])
def test_auto_follows_native_cpu_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: native)
    resolved = resolve_precision("auto", "cpu")
    assert resolved.name == expected and resolved.requested == "auto"
    assert resolved.describe().startswith(f"{expected} (auto: this CPU has")


def test_native_cpu_bf16_detection(monkeypatch):
    """torch's capability checks first, then the flags of /proc/cpuinfo."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(precision_module, "_cpuinfo_flags", lambda: {"avx512f", "avx512_vnni"})
    assert not precision_module.cpu_has_native_bf16()
    monkeypatch.setattr(precision_module, "_cpuinfo_flags", lambda: {"avx512f", "amx_bf16"})
    assert precision_module.cpu_has_native_bf16()
    monkeypatch.setattr(precision_module, "_cpuinfo_flags", set)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert precision_module.cpu_has_native_bf16()


def test_config_check_names_the_key():
    cfg = OmegaConf.create({"train": {"precision": "bf61"}})
    with pytest.raises(ConfigError, match="train.precision='bf61' is not a precision"):
        check_config(cfg)
    check_config(OmegaConf.create({"train": {"precision": "auto"}}))


def test_run_in_fp32_only_changes_autocast_regions():
    linear = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    assert torch.equal(run_in_fp32(linear, x), linear(x))  # no autocast: the plain call
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x).dtype == torch.bfloat16
        inside = run_in_fp32(lambda t, mask: (t.dtype, mask, torch.is_autocast_enabled("cpu"), linear(t).dtype),
                             x.bfloat16(), None)
    assert inside == (torch.float32, None, False, torch.float32)


# ----------------------------------------------------------------------------- accuracy
def _trained_looking(model):
    """Random weights with heads that give spread scores and modest box offsets (a zero-initialized
    box head would make every box its anchor and hide the box drift)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for head in (model.bbox_embed if isinstance(model.bbox_embed, torch.nn.ModuleList) else [model.bbox_embed]):
            head.layers[-1].weight.copy_(torch.randn(head.layers[-1].weight.shape, generator=g) * 0.05)
        for head in (model.class_embed if isinstance(model.class_embed, torch.nn.ModuleList) else [model.class_embed]):
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.3)
    return model.eval()


def _per_layer(model, inputs):
    images = model.preprocess_image(inputs)
    out = model.predict(images.tensor, model.padding_mask(images))
    layers = out["aux_outputs"] + [out]
    return (torch.stack([o["pred_logits"] for o in layers]).sigmoid(), torch.stack([o["pred_boxes"] for o in layers]))


@pytest.mark.parametrize("config", ["dab_detr", "deformable"])
def test_bf16_detections_within_measured_drift(config):
    """Per decoder layer, bf16 scores and boxes stay within 0.03 (scores) and 0.005 (boxes, in units
    of the image size) of fp32: the measured maxima on the demo checkpoint (0.026, 0.6 px of
    224 = 0.0027) with a margin for random weights. The final detections are fp32 tensors and
    the best scores are those of fp32."""
    torch.manual_seed(0)
    if config == "dab_detr":
        model = instantiate(small_model_config())
    else:
        from test_deformable_model import make_model

        model = make_model(depth=18, num_queries=20, **{"transformer.num_encoder_layers": 1,
                                                        "transformer.num_decoder_layers": 2})
    model = _trained_looking(model)
    inputs = make_inputs([(64, 96), (56, 80)], with_targets=False)
    with torch.no_grad():
        scores32, boxes32 = _per_layer(model, inputs)
        detections32 = model(inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores16, boxes16 = _per_layer(model, inputs)
            detections16 = model(inputs)
    assert scores16.dtype == boxes16.dtype == torch.float32
    score_drift = (scores16 - scores32).abs().flatten(1).max(1).values
    box_drift = (boxes16 - boxes32).abs().flatten(1).max(1).values
    assert (score_drift < 0.03).all(), score_drift
    assert (box_drift < 0.005).all(), box_drift
    for a, b in zip(detections32, detections16):
        a, b = a["instances"], b["instances"]
        assert b.scores.dtype == torch.float32 and b.pred_boxes.tensor.dtype == torch.float32
        # the best scores agree (near-tied pairs of a random model may swap places)
        assert (a.scores[:5] - b.scores[:5]).abs().max() < 0.03


# ----------------------------------------------------------------------------- where it reaches
class _AutocastProbe:
    """Records the autocast state each time the model's backbone runs."""

    def __init__(self, model):
        self.seen = []
        model.backbone.register_forward_pre_hook(self._record)

    def _record(self, _module, _inputs):
        enabled = torch.is_autocast_enabled("cpu")
        self.seen.append(torch.get_autocast_dtype("cpu") if enabled else torch.float32)


@pytest.fixture
def small_checkpoint(tmp_path):
    """A small demo-config model saved as a checkpoint, and the overrides that build it."""
    overrides = ["model.transformer.d_model=64", "model.position_embedding.num_pos_feats=32",
                 "model.transformer.dim_feedforward=128", "model.transformer.num_encoder_layers=1",
                 "model.transformer.num_decoder_layers=2"]
    from dab_detr.predictor import load_lazy_config

    cfg = load_lazy_config(DEMO_CONFIG, overrides)
    torch.manual_seed(0)
    path = tmp_path / "model.pth"
    torch.save({"model": instantiate(cfg.model).state_dict()}, path)
    return str(path), overrides


@pytest.mark.parametrize("argument, config_value, expected", [
    ("bf16", "fp32", torch.bfloat16), (None, "bf16", torch.bfloat16), (None, "fp32", torch.float32),
])
def test_predictor_runs_the_setting(small_checkpoint, argument, config_value, expected):
    path, overrides = small_checkpoint
    predictor = Predictor(DEMO_CONFIG, path, overrides + [f"train.precision={config_value}"], device="cpu",
                          precision=argument)
    probe = _AutocastProbe(predictor.model)
    out = predictor(torch.randint(0, 256, (90, 120, 3), dtype=torch.uint8).numpy())
    assert probe.seen == [expected]
    assert out["instances"].scores.dtype == torch.float32
    with pytest.raises(PrecisionError, match="fp16 needs a CUDA device"):
        Predictor(DEMO_CONFIG, path, overrides, device="cpu", precision="fp16")


def test_predict_tool_flag(small_checkpoint, tmp_path, capsys):
    path, overrides = small_checkpoint
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (120, 90), (30, 200, 90)).save(image)
    predict = load_tool("predict")
    predict.main(["--config-file", DEMO_CONFIG, "--input", str(image), "--device", "cpu", "--precision", "bf16",
                  "--output", str(tmp_path / "drawn.png")] + overrides + [f"train.init_checkpoint={path}"])
    assert "precision bf16" in capsys.readouterr().out and (tmp_path / "drawn.png").is_file()
    with pytest.raises(SystemExit, match="error: precision=fp16 needs a CUDA device"):
        predict.main(["--config-file", DEMO_CONFIG, "--input", str(image), "--device", "cpu", "--precision",
                      "fp16"] + overrides + [f"train.init_checkpoint={path}"])


def test_evaluation_runs_the_setting(monkeypatch):
    """LazyConfigTrainer.test (--eval-only and the periodic evaluation) runs under train.precision."""
    import dab_detr.engine.trainer as trainer_module

    seen = []

    def fake_inference(model, data_loader, evaluator):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return {}

    monkeypatch.setattr(trainer_module, "inference_on_dataset", fake_inference)
    model = instantiate(small_model_config())
    for value, expected in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        cfg = OmegaConf.create({"dataloader": {"test": {"_target_": "builtins.list"},
                                               "evaluator": {"_target_": "builtins.dict"}},
                                "train": {"precision": value}})
        LazyConfigTrainer.test(cfg, model)
    assert seen == [torch.bfloat16, torch.float32]


def test_training_precision_and_legacy_amp(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    assert training_precision({"precision": "auto"}, "cpu").name == "bf16"
    assert training_precision({"precision": "fp32", "amp": {"enabled": True}}, "cpu").name == "bf16"
    assert training_precision({"precision": "fp32", "amp": {"enabled": False}}, "cpu").name == "fp32"
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    assert training_precision({"precision": "auto"}, "cpu").name == "fp32"


def test_bf16_training_step_has_fp32_losses_and_matching():
    torch.manual_seed(0)
    model = instantiate(small_model_config()).train()
    seen = {}
    pairwise_cost = model.criterion.matcher.pairwise_cost

    def recording_cost(logits, boxes, labels, tgt_boxes):
        seen["matcher"] = (torch.is_autocast_enabled("cpu"), logits.dtype, boxes.dtype)
        return pairwise_cost(logits, boxes, labels, tgt_boxes)

    model.criterion.matcher.pairwise_cost = recording_cost
    layer_losses = model.criterion.layer_losses

    def recording_losses(*args):
        losses, metrics = layer_losses(*args)
        seen["criterion"] = (torch.is_autocast_enabled("cpu"), {v.dtype for v in losses.values()})
        return losses, metrics

    model.criterion.layer_losses = recording_losses
    probe = _AutocastProbe(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loop = DETRTrainLoop(model, iter([make_inputs([(64, 80), (72, 64)])]), optimizer,
                         amp=True, amp_dtype=torch.bfloat16, clip_grad_max_norm=0.1)
    assert not loop.grad_scaler.is_enabled()  # bf16: no gradient scaler
    loop.iter = 0
    with EventStorage(0) as storage:
        loop.run_step()
    assert probe.seen == [torch.bfloat16]
    assert seen["matcher"] == (False, torch.float32, torch.float32)
    assert seen["criterion"] == (False, {torch.float32})
    total = storage.history("total_loss").latest()
    assert torch.isfinite(torch.tensor(total)) and total > 0
    assert all(p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all())
               for p in model.parameters())


def test_benchmark_precision_list_and_legacy_amp():
    import argparse

    benchmark = load_tool("benchmark")
    cpu = torch.device("cpu")

    def names(**kwargs):
        args = argparse.Namespace(**{"precision": "fp32", "amp": False, "amp_dtype": None, **kwargs})
        return [p.name for p in benchmark.benchmark_precisions(args, cpu)]

    assert names(precision="fp32,bf16") == ["fp32", "bf16"]
    assert names(amp=True) == ["bf16"]  # the older --amp: bf16 on CPU
    with pytest.raises(SystemExit, match="benchmark: --precision=fp16 needs a CUDA device"):
        names(precision="fp32,fp16")
