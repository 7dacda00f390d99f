"""tools/demo.py end to end, shrunk: a few iterations on a few generated images."""
import json
import os
import sys

from conftest import load_tool
from detectron2.data import DatasetCatalog, MetadataCatalog

from dab_detr.data import demo_dataset


def forget_demo_datasets():
    """Remove the demo datasets and their metadata (which records the dataset root)."""
    for name in ("dab_demo_train", "dab_demo_val"):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


def test_demo_trains_evaluates_draws_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setattr(demo_dataset, "_SPLITS", {"train": (8, 1), "val": (3, 2)})
    forget_demo_datasets()  # registered by an earlier config load (another root): re-register here
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["demo.py", "--num-images", "2", "--score-threshold", "0.0",
                                      f"train.output_dir={out}", "train.max_iter=3",
                                      "dataloader.train.total_batch_size=2", "train.log_period=1"])
    try:
        load_tool("demo").main()
    finally:
        forget_demo_datasets()
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["iterations"] == 3 and 0.0 <= summary["AP"] <= 100.0
    assert (out / "model_final.pth").is_file() and (out / "metrics.json").is_file()
    pictures = sorted(os.listdir(out / "predictions"))
    assert pictures == ["000000_pred.png", "000001_pred.png"]
    assert "COCO box AP" in printed and str(out / "model_final.pth") in printed and "--eval-only" in printed
