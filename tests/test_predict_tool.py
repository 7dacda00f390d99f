"""tools/predict.py on a small model trained here: COCO JSON = --eval-only, folders, videos."""
import json
import logging
import os
import shutil

import cv2
import numpy as np
import pytest
from conftest import load_tool
from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dab_detr.data import demo_dataset
from dab_detr.engine import LazyConfigTrainer

DEMO_CONFIG = "configs/dab_detr_demo.py"
DEMO_NAMES = ("dab_demo_train", "dab_demo_val")


def _unregister():
    """Forget the demo datasets (their metadata too: it records the root they were registered with)."""
    for name in DEMO_NAMES:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small DAB-DETR trained for a few iterations on 4 generated demo images, evaluated on the
    same 4 (so that its AP is not 0). Yields the config overrides, the --eval-only results and paths."""
    root = tmp_path_factory.mktemp("predict_tool")
    out = root / "run"
    overrides = [
        "model.transformer.d_model=64", "model.position_embedding.num_pos_feats=32",
        "model.transformer.dim_feedforward=128", "model.transformer.num_encoder_layers=1",
        "model.transformer.num_decoder_layers=2",
        "dataloader.train.dataset.names=dab_demo_val", "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0", "dataloader.train.total_batch_size=2",
        "dataloader.train.mapper.augmentation.1.short_edge_length=[96]",
        "dataloader.train.mapper.augmentation.1.max_size=128",
        "dataloader.test.mapper.augmentation.0.short_edge_length=96",
        "dataloader.test.mapper.augmentation.0.max_size=128",
        "train.max_iter=40", "optimizer.lr=1e-3", "train.log_period=20", "train.checkpointer.period=1000",
        f"train.output_dir={out}",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTRON2_DATASETS", str(root / "datasets"))
        mp.setattr(demo_dataset, "_SPLITS", {"train": (2, 1), "val": (4, 2)})
        _unregister()
        try:
            cfg = LazyConfig.apply_overrides(LazyConfig.load(DEMO_CONFIG), overrides)
            trainer = LazyConfigTrainer(cfg)
            trainer.resume_or_load(resume=False)
            trainer.train()
            checkpoint = str(out / "model_final.pth")
            # exactly what `lazyconfig_train_net.py --eval-only` runs
            cfg.train.init_checkpoint = checkpoint
            evaluation = load_tool("lazyconfig_train_net").evaluate(cfg)
            yield {"overrides": overrides + [f"train.init_checkpoint={checkpoint}"], "eval": evaluation["bbox"],
                   "out": out, "val_dir": root / "datasets" / "dab_demo" / "val",
                   "val_json": root / "datasets" / "dab_demo" / "annotations" / "val.json"}
        finally:
            _unregister()


def run_predict(trained, *args):
    return load_tool("predict").main(["--config-file", DEMO_CONFIG, *args, *trained["overrides"]])


def test_coco_json_scores_the_eval_only_ap(trained, tmp_path):
    results_path = tmp_path / "results.json"
    run_predict(trained, "--input", str(trained["val_dir"]), "--json", str(results_path))  # batch 1, as the evaluation
    results = json.loads(results_path.read_text())
    # the same detections as COCOEvaluator's own results file of --eval-only
    evaluator = json.loads((trained["out"] / "coco_instances_results.json").read_text())
    key = lambda r: (r["image_id"], -r["score"], r["category_id"])  # noqa: E731
    results, evaluator = sorted(results, key=key), sorted(evaluator, key=key)
    assert len(results) == len(evaluator) > 0
    for ours, theirs in zip(results, evaluator):
        assert (ours["image_id"], ours["category_id"]) == (theirs["image_id"], theirs["category_id"])
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-5)
        assert ours["bbox"] == pytest.approx(theirs["bbox"], abs=1e-2)
    # and scored with pycocotools, the same AP
    gt = COCO(str(trained["val_json"]))
    evaluation = COCOeval(gt, gt.loadRes(str(results_path)), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert trained["eval"]["AP"] > 0  # trained: the comparison is not between two zeros
    assert 100 * evaluation.stats[0] == pytest.approx(trained["eval"]["AP"], abs=0.1)


def test_folder_with_a_corrupt_and_a_text_file(trained, tmp_path, caplog):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in sorted(os.listdir(trained["val_dir"]))[:2]:
        shutil.copy(trained["val_dir"] / name, folder / name)
    png = (trained["val_dir"] / sorted(os.listdir(trained["val_dir"]))[2]).read_bytes()
    (folder / "broken.png").write_bytes(png[: len(png) // 3])  # truncated
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "drawn"
    logging.getLogger("dab_detr.predict").addHandler(caplog.handler)
    try:
        run_predict(trained, "--input", str(folder), "--output", str(out), "--confidence-threshold", "0.0")
    finally:
        logging.getLogger("dab_detr.predict").removeHandler(caplog.handler)
    assert sorted(os.listdir(out)) == ["000000.png", "000001.png"]
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("broken.png" in m for m in skipped) and any("notes.txt" in m for m in skipped)
    for name in ("000000.png", "000001.png"):  # drawn: the boxes changed the picture
        drawn = np.asarray(Image.open(out / name).convert("RGB")).astype(int)
        original = np.asarray(Image.open(folder / name).convert("RGB")).astype(int)
        assert drawn.shape == original.shape and np.abs(drawn - original).max() > 100


def test_video_every_frame_drawn(trained, tmp_path):
    frames = [np.asarray(Image.open(trained["val_dir"] / "000000.png").convert("RGB"))[:, :, ::-1]] * 5
    frames = [np.ascontiguousarray(np.roll(f, 6 * i, axis=1)) for i, f in enumerate(frames)]
    height, width = frames[0].shape[:2]
    video = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()

    run_predict(trained, "--video-input", video, "--output", str(tmp_path / "out"), "--confidence-threshold", "0.0",
                "--batch-size", "2")
    capture = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    assert capture.isOpened()
    drawn = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        drawn.append(frame)
    capture.release()
    assert len(drawn) == len(frames)
    for original, frame in zip(frames, drawn):
        assert frame.shape == original.shape
        # boxes drawn on every frame (well above the codec's error)
        assert (np.abs(frame.astype(int) - original.astype(int)).max(axis=2) > 100).mean() > 0.005

    (tmp_path / "fake.mp4").write_text("not a video")
    with pytest.raises(SystemExit, match="fake.mp4: OpenCV cannot open this video"):
        run_predict(trained, "--video-input", str(tmp_path / "fake.mp4"))
    with pytest.raises(SystemExit, match="missing.png does not exist"):
        run_predict(trained, "--input", str(tmp_path / "missing.png"))


@pytest.mark.parametrize("missing", ["checkpoint", "config"])
def test_missing_checkpoint_or_config_is_one_line(tmp_path, missing):
    """A checkpoint or config file that does not exist: exit 1 with one line naming it, no traceback
    (run as a user runs it: a subprocess of the tool)."""
    import subprocess
    import sys

    from conftest import REPO

    path = tmp_path / ("nowhere.pth" if missing == "checkpoint" else "nowhere.py")
    config = DEMO_CONFIG if missing == "checkpoint" else str(path)
    weights = path if missing == "checkpoint" else tmp_path / "also_missing.pth"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "predict.py"), "--config-file", config,
         "--input", str(tmp_path), f"train.init_checkpoint={weights}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(path) in last and "does not exist" in last, proc.stderr
