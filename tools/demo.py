#!/usr/bin/env python
"""The main job on a machine without COCO or GPU (``make demo``).

Trains DAB-DETR from scratch on the embedded synthetic dataset (generated on first use), on CPU,
then evaluates it with COCOEvaluator, prints the AP table, draws the predicted boxes on a few
validation images with Detectron2's Visualizer, and says where the checkpoint, metrics and
pictures are. Everything goes through the same trainer and config system as COCO training.

    python tools/demo.py                       # train + evaluate + draw
    python tools/demo.py --eval-only           # evaluate and draw the last demo checkpoint
    python tools/demo.py train.max_iter=200    # any config override
"""
import argparse
import json
import logging
import os
import time

import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog
from detectron2.engine import default_setup
from detectron2.utils.logger import setup_logger

from dab_detr.checkpoint import DABDETRCheckpointer
from dab_detr.config_checks import load_checked_config
from dab_detr.drawing import dataset_metadata, draw_detections
from dab_detr.engine import LazyConfigTrainer
from dab_detr.predictor import Predictor, read_image_file
from dab_detr.user_errors import exit_on_user_errors

logger = logging.getLogger("dab_detr.demo")


def draw_predictions(cfg, model, out_dir, num_images, score_threshold):
    """Save ``num_images`` validation images with the predicted boxes drawn (through
    ``dab_detr.Predictor`` and ``dab_detr.drawing``, as ``tools/predict.py`` draws them)."""
    predictor = Predictor.from_model(cfg, model)
    metadata = dataset_metadata(cfg)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for record in DatasetCatalog.get(cfg.dataloader.test.dataset.names)[:num_images]:
        image = read_image_file(record["file_name"], "RGB")
        instances = predictor(image, array_format="RGB")["instances"]
        drawn = draw_detections(image, instances, metadata, score_threshold, scale=3.0)
        path = os.path.join(out_dir, os.path.splitext(os.path.basename(record["file_name"]))[0] + "_pred.png")
        drawn.save(path)
        paths.append(path)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/dab_detr_demo.py")
    parser.add_argument("--eval-only", action="store_true", help="skip training; use output_dir/model_final.pth")
    parser.add_argument("--num-images", type=int, default=6, help="validation images to draw")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="draw detections scoring at least this")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    args = parser.parse_args()

    with exit_on_user_errors():  # a missing config or an override typo: one line naming it
        cfg = load_checked_config(args.config_file, args.opts)
    out = cfg.train.output_dir
    default_setup(cfg, args)  # loggers, seed, config.yaml in the output folder
    setup_logger(out, name="dab_detr")

    start = time.perf_counter()
    if args.eval_only:
        model = instantiate(cfg.model)
        with exit_on_user_errors():  # no demo checkpoint yet: say so
            DABDETRCheckpointer(model).load(os.path.join(out, "model_final.pth"))
        train_seconds = 0.0
    else:
        trainer = LazyConfigTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        model = trainer.model
        train_seconds = time.perf_counter() - start

    start = time.perf_counter()
    results = LazyConfigTrainer.test(cfg, model)
    eval_seconds = time.perf_counter() - start
    pictures = draw_predictions(cfg, model, os.path.join(out, "predictions"), args.num_images, args.score_threshold)

    bbox = results.get("bbox", {})
    summary = {"AP": bbox.get("AP"), "AP50": bbox.get("AP50"), "AP75": bbox.get("AP75"),
               "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
               "iterations": cfg.train.max_iter, "threads": torch.get_num_threads()}
    with open(os.path.join(out, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    checkpoint = os.path.join(out, "model_final.pth")
    print("\n" + "=" * 78)
    print(f"DAB-DETR demo: COCO box AP {summary['AP']:.1f} (AP50 {summary['AP50']:.1f}, AP75 {summary['AP75']:.1f}) "
          f"on {cfg.dataloader.test.dataset.names}")
    print(f"  training {train_seconds / 60:.1f} min ({cfg.train.max_iter} iterations), "
          f"evaluation {eval_seconds:.0f} s, {torch.get_num_threads()} CPU threads")
    print(f"  checkpoint:  {checkpoint}")
    print(f"  metrics:     {os.path.join(out, 'metrics.json')} (TensorBoard: tensorboard --logdir {out})")
    print(f"  log:         {os.path.join(out, 'log.txt')}")
    print(f"  pictures:    {os.path.dirname(pictures[0]) if pictures else '-'} ({len(pictures)} images)")
    print("  evaluate it again with:")
    print(f"    .venv/bin/python tools/lazyconfig_train_net.py --config-file {args.config_file} --eval-only "
          f"train.init_checkpoint={checkpoint}")
    print("=" * 78)


if __name__ == "__main__":
    main()
