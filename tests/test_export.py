"""Export to ONNX and torch.export: the exported programs give PyTorch's detections on real photos
of other sizes than the export sample; named errors for every bad input.

Models come from the real configs, shrunk (fewer and narrower transformer layers, fewer queries)
and run on small images so that the file stays fast. The full-size check is tools/check_export.py.
"""
import os
import subprocess
import sys

import cv2
import matplotlib
import numpy as np
import pytest
import skimage.data
import torch
from torch import nn

from detectron2.config import LazyConfig, instantiate

from dab_detr.export import (DeploymentModel, ExportMismatchError, MissingExportDependencyError,
                             NotExportableError, OutputPathError, compare_detections, export_detector,
                             load_torch_program, onnx_session, pytorch_detections, run_onnx)
from dab_detr.export import optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = (96, 128)  # export sample (H, W); export_detector also checks 128 x 96


def photos(input_format="RGB"):
    """Two real photographs at small sizes other than the sample: portrait (Grace Hopper, 112 x 88)
    and landscape (scikit-image's chelsea, 72 x 108), as [1, 3, H, W] float 0..255."""
    hopper = cv2.imread(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))[:, :, ::-1]
    images = [cv2.resize(np.ascontiguousarray(hopper), (88, 112), interpolation=cv2.INTER_AREA),
              cv2.resize(skimage.data.chelsea(), (108, 72), interpolation=cv2.INTER_AREA)]
    if input_format == "BGR":
        images = [im[:, :, ::-1] for im in images]
    return [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float() for im in images]


R18 = {"backbone.stages.depth": 18}  # basic blocks: fewer operations to trace (DC5 needs 50)


def small_model(config, **overrides):
    """The config's model with the transformer shrunk; ``overrides`` are dotted model keys."""
    cfg = LazyConfig.load(os.path.join(ROOT, "configs", config))
    m = cfg.model
    m.transformer.update(num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64, d_model=64)
    m.position_embedding.num_pos_feats = 32
    for key, value in overrides.items():
        target = m
        *path, last = key.split(".")
        for p in path:
            target = getattr(target, p)
        setattr(target, last, value)
    torch.manual_seed(0)
    return instantiate(m).eval()


def assert_matches_pytorch_on_photos(model, run, input_format="RGB"):
    for image in photos(input_format):
        diff = compare_detections(pytorch_detections(model, image), run(image))
        assert diff.ok, f"{tuple(image.shape[-2:])}: {diff}"
        assert diff.unmatched == 0 and diff.max_score_diff <= 1e-4 and diff.max_box_diff <= 1e-2


def assert_report_checked(report, num_detections):
    assert report.num_detections == num_detections
    assert [size for size, _ in report.checks] == [SAMPLE, SAMPLE[::-1]]
    assert all(diff.ok for _, diff in report.checks)


DEMO_OVERRIDES = {"transformer.num_decoder_layers": 2, "transformer.num_encoder_layers": 1}


@pytest.fixture(scope="module")
def demo_model():
    """The demo config (DAB-DETR with a small ResNet), 1 encoder and 2 decoder layers."""
    cfg = LazyConfig.load(os.path.join(ROOT, "configs", "dab_detr_demo.py"))
    cfg.model.transformer.update(num_encoder_layers=1, num_decoder_layers=2)
    torch.manual_seed(0)
    return instantiate(cfg.model).eval()


def test_torch_export_3patterns_dc5_matches_pytorch_on_photos(tmp_path):
    # the 3-pattern config with the DC5 backbone of configs/dab_detr_r50_dc5.py (full R50)
    model = small_model("dab_detr_r50_3patterns.py", num_queries=10, **{"backbone.stages.res5_dilation": 2})
    assert model.transformer.num_patterns == 3
    path = str(tmp_path / "dc5_3patterns.pt2")
    report = export_detector(model, "torch_export", path, sample_size=SAMPLE)
    assert_report_checked(report, 300)  # 30 queries x 80 classes, top 300
    assert_matches_pytorch_on_photos(model, load_torch_program(path))


def test_onnx_deformable_matches_pytorch_on_photos(tmp_path):
    model = small_model("dab_deformable_detr_r50.py", num_queries=10, **R18)
    path = str(tmp_path / "deformable.onnx")
    report = export_detector(model, "onnx", path, sample_size=SAMPLE)
    assert_report_checked(report, 100)
    session = onnx_session(path, providers=["CPUExecutionProvider"])
    assert_matches_pytorch_on_photos(model, lambda image: run_onnx(session, image))


def test_torch_export_two_stage_deformable_bgr_matches_pytorch_on_photos(tmp_path):
    # two-stage; BGR input as a config can declare it (pixel mean/std in BGR order)
    model = small_model("dab_deformable_detr_r50_two_stage.py", num_queries=10, input_format="BGR", **R18,
                        pixel_mean=[103.53, 116.28, 123.675], pixel_std=[57.375, 57.12, 58.395])
    assert model.transformer.two_stage
    path = str(tmp_path / "two_stage.pt2")
    report = export_detector(model, "torch_export", path, sample_size=SAMPLE)
    assert_report_checked(report, 100)
    assert_matches_pytorch_on_photos(model, load_torch_program(path), input_format="BGR")


def test_export_tool_writes_onnx_that_matches_pytorch_on_photos(demo_model, tmp_path):
    """tools/export_model.py on the demo config (DAB-DETR) with a checkpoint: the ONNX file's
    signature and metadata, and onnxruntime's detections on the photos equal PyTorch's."""
    weights = tmp_path / "model.pth"
    torch.manual_seed(1)
    for p in demo_model.parameters():
        p.data.add_(0.01 * torch.randn_like(p))  # weights the config alone would not produce
    torch.save({"model": demo_model.state_dict()}, weights)
    output = tmp_path / "demo.onnx"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "export_model.py"), "--config-file",
         os.path.join(ROOT, "configs", "dab_detr_demo.py"), "--format", "onnx", "--output", str(output),
         "--sample-size", *map(str, SAMPLE), f"train.init_checkpoint={weights}",
         *[f"model.{key}={value}" for key, value in DEMO_OVERRIDES.items()]],
        capture_output=True, text=True, cwd=str(tmp_path), timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {output} (onnx): image [1, 3, H, W] -> boxes [80, 4]" in result.stdout  # 20 queries x 4 classes
    assert "H >= 17, W >= 17" in result.stdout  # stride 16: sizes stay symbolic from a 2 x 2 feature map on
    assert result.stdout.count("against PyTorch: max |score diff|") == 2 and "input format RGB" in result.stdout
    session = onnx_session(str(output), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape, i.type) for i in session.get_inputs()] == [("image", [1, 3, "height", "width"], "tensor(float)")]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("boxes", [80, 4]), ("scores", [80]), ("labels", [80])]
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["input_format"] == "RGB" and meta["size_divisibility"] == "1"  # Detectron2's ResNet: no divisibility
    assert (meta["min_height"], meta["min_width"]) == ("17", "17")
    assert_matches_pytorch_on_photos(demo_model, lambda image: run_onnx(session, image))


# ---------------------------------------------------------------------------------- bad input
class DataDependentBranch(nn.Module):
    """Wraps a module with a Python branch on a tensor value (cannot be traced with symbolic sizes)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.sum() > 0:
            return self.inner(x)
        return -self.inner(x)


class PythonCounter(nn.Module):
    """Adds a Python-side call counter: the exported program bakes in the value seen while tracing."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x) * self.calls


def test_untraceable_module_is_named(demo_model, tmp_path):
    model = small_model("dab_detr_demo.py")
    model.transformer.decoder.query_scale = DataDependentBranch(model.transformer.decoder.query_scale)
    with pytest.raises(NotExportableError, match=r"module 'transformer\.decoder\.query_scale' \(DataDependentBranch"):
        export_detector(model, "torch_export", str(tmp_path / "x.pt2"), sample_size=SAMPLE)
    assert os.listdir(tmp_path) == []


def test_other_models_are_refused():
    with pytest.raises(NotExportableError, match="cannot export a Linear: only DAB-DETR and DAB-Deformable-DETR"):
        DeploymentModel(nn.Linear(2, 2))


def test_disagreeing_program_is_not_written(tmp_path):
    model = small_model("dab_detr_demo.py")
    model.class_embed = PythonCounter(model.class_embed)
    target = tmp_path / "bad.pt2"
    with pytest.raises(ExportMismatchError, match=r"disagrees with PyTorch at input \d+x\d+: max \|score diff\| [0-9.e+-]+ "
                                                  r".*nothing was written"):
        export_detector(model, "torch_export", str(target), sample_size=SAMPLE)
    assert os.listdir(tmp_path) == []  # neither the file nor the temporary one


@pytest.mark.parametrize("output, message", [
    ("missing_dir/model.onnx", "the directory .*missing_dir' does not exist"),
    (".", "is a directory"),
    ("model.onnx.pt", None),
])
def test_unwritable_output_is_named(demo_model, tmp_path, output, message):
    fmt = "onnx"
    if message is None:  # a torch.export program needs the .pt2 suffix
        fmt, message = "torch_export", "must be saved with the suffix .pt2"
    with pytest.raises(OutputPathError, match=message):
        export_detector(demo_model, fmt, str(tmp_path / output))


def test_read_only_directory_is_named(demo_model, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write to read-only directories")
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OutputPathError, match="is not writable"):
            export_detector(demo_model, "onnx", str(tmp_path / "m.onnx"))
    finally:
        tmp_path.chmod(0o700)


def test_missing_onnxruntime_says_what_to_install(demo_model, tmp_path, monkeypatch):
    real_import = optional.importlib.import_module

    def fake_import(name, *args):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args)

    monkeypatch.setattr(optional.importlib, "import_module", fake_import)
    with pytest.raises(MissingExportDependencyError, match=r"'onnxruntime'.*pip install -e \.\[export\]"):
        export_detector(demo_model, "onnx", str(tmp_path / "m.onnx"))


def test_comparison_counts_real_differences_and_tolerates_rank_swaps():
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [1, 2, 3, 4]])
    scores = torch.tensor([0.9, 0.5, 0.49995])
    labels = torch.tensor([1, 2, 3])
    ref = (boxes, scores, labels)
    assert compare_detections(ref, ref).ok
    swapped = (boxes[[0, 2, 1]], torch.tensor([0.9, 0.49998, 0.49997]), labels[[0, 2, 1]])
    diff = compare_detections(ref, swapped)
    assert diff.ok and diff.unmatched == 0 and diff.max_score_diff == pytest.approx(2e-5, abs=1e-7)
    moved = (boxes + torch.tensor([[0.0, 0, 0, 0.02], [0, 0, 0, 0], [0, 0, 0, 0]]), scores, labels)
    diff = compare_detections(ref, moved)
    assert not diff.ok and diff.unmatched == 1
    relabelled = (boxes, scores, torch.tensor([0, 2, 3]))
    assert compare_detections(ref, relabelled).unmatched == 1


def test_deployment_model_takes_one_image(demo_model):
    with pytest.raises(ValueError, match=r"takes one image \[1, 3, H, W\], got \(2, 3, 64, 64\)"):
        DeploymentModel(demo_model)(torch.zeros(2, 3, 64, 64))
