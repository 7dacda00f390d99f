#!/usr/bin/env python
"""Full-size check of the exports: ONNX (onnxruntime) and torch.export against PyTorch on real photos.

    python tools/check_export.py                      # the five configs below, both formats
    python tools/check_export.py --configs configs/dab_detr_r50.py --formats onnx

For each config: the model with random weights (seed 0; ``--weights`` loads a checkpoint instead)
is exported by ``dab_detr.export.export_detector`` at ``--sample-size`` (default: the config's
test-time short edge x max size, e.g. 800 x 1333), which verifies itself on two synthetic images;
then the written file runs on two real photographs, a portrait (matplotlib's Grace Hopper,
600 x 512) and a landscape (scikit-image's chelsea, 300 x 451), resized by the config's own
test-time augmentation (``dataloader.test.mapper.augmentation``) and given in the config's pixel
format. Their detections must equal PyTorch's within 1e-4 in score and 1e-2 px in box, with the
same labels. Prints one row per (config, format, photo) and exits 1 if any row fails.
"""
import argparse
import os
import sys
import tempfile
import time

import cv2
import matplotlib
import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.data import transforms as T

from dab_detr.checkpoint import DABDETRCheckpointer
from dab_detr.export import (compare_detections, export_detector, load_torch_program, onnx_session,
                             pytorch_detections, run_onnx)
from dab_detr.predictor import load_lazy_config
from dab_detr.user_errors import InputFileError, exit_on_user_errors, output_problem

CONFIGS = ["configs/dab_detr_r50.py", "configs/dab_detr_r50_3patterns.py", "configs/dab_detr_r50_dc5.py",
           "configs/dab_deformable_detr_r50.py", "configs/dab_detr_demo.py"]


def photographs():
    """{name: RGB uint8 [H, W, 3]}: a portrait and a landscape photograph shipped with the test packages."""
    import skimage.data

    hopper = cv2.imread(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
    return {"grace_hopper (portrait)": np.ascontiguousarray(hopper[:, :, ::-1]),
            "chelsea (landscape)": skimage.data.chelsea()}


def test_time_image(cfg, rgb, short_edge=None, max_size=None):
    """The photo as the config's test loader would give it: [1, 3, H, W] float, resized, in its pixel format."""
    if short_edge:
        augs = [T.ResizeShortestEdge(short_edge, max_size or 10**9)]
    else:
        augs = instantiate(cfg.dataloader.test.mapper.augmentation)
    image = T.apply_augmentations(augs, rgb)[0]
    if cfg.model.input_format == "BGR":
        image = image[:, :, ::-1]
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()  # a writable copy


def default_sample_size(cfg, short_edge=None, max_size=None):
    if short_edge:
        return short_edge, max_size
    resize = next(a for a in instantiate(cfg.dataloader.test.mapper.augmentation) if isinstance(a, T.ResizeShortestEdge))
    return max(resize.short_edge_length), resize.max_size


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--formats", nargs="+", default=["onnx", "torch_export"], choices=["onnx", "torch_export"])
    parser.add_argument("--sample-size", type=int, nargs=2, metavar=("H", "W"), default=None)
    parser.add_argument("--short-edge", type=int, default=None, help="resize photos to this short edge instead of the config's")
    parser.add_argument("--max-size", type=int, default=None)
    parser.add_argument("--weights", default=None, help="checkpoint to load (default: random weights, seed 0)")
    parser.add_argument("--output-dir", default=None, help="keep the exported files here (default: a temporary directory)")
    args = parser.parse_args(argv)
    with exit_on_user_errors():  # a missing or unreadable config, checkpoint or output folder: one line naming it
        return check_all(args)


def check_all(args):
    configs = {config: load_lazy_config(config) for config in args.configs}  # all read before the first export
    if args.output_dir:
        problem = output_problem(os.path.join(args.output_dir, "model.onnx"))
        if problem:
            raise InputFileError(f"--output-dir {args.output_dir}: a file there {problem}")
        os.makedirs(args.output_dir, exist_ok=True)
    photos = photographs()
    failures = 0
    limits = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| config | format | photo | input | max score diff | max box diff (px) | unmatched | PyTorch s | exported s | export + self-check s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.output_dir or tmp
        for config, cfg in configs.items():
            torch.manual_seed(0)
            model = instantiate(cfg.model).eval()
            if args.weights:
                DABDETRCheckpointer(model).load(args.weights)
            sample = tuple(args.sample_size) if args.sample_size else default_sample_size(cfg, args.short_edge, args.max_size)
            name = os.path.splitext(os.path.basename(config))[0]
            for fmt in args.formats:
                path = os.path.join(out_dir, f"{name}.{'onnx' if fmt == 'onnx' else 'pt2'}")
                report, t_export = timed(lambda: export_detector(model, fmt, path, sample_size=sample))
                limits.append(f"{name} {fmt}: traced at {sample[0]}x{sample[1]}, accepts H >= {report.min_size[0]}, "
                              f"W >= {report.min_size[1]}, K = {report.num_detections}")
                run = load_torch_program(path) if fmt == "torch_export" else \
                    (lambda s: (lambda image: run_onnx(s, image)))(onnx_session(path, providers=["CPUExecutionProvider"]))
                for photo, rgb in photos.items():
                    image = test_time_image(cfg, rgb, args.short_edge, args.max_size)
                    reference, t_torch = timed(lambda: pytorch_detections(model, image))
                    outputs, t_program = timed(lambda: run(image))
                    diff = compare_detections(reference, outputs)
                    failures += not diff.ok
                    h, w = image.shape[-2:]
                    print(f"| {name} | {fmt} | {photo} | {h}x{w} | {diff.max_score_diff:.1e} | {diff.max_box_diff:.1e} | "
                          f"{diff.unmatched}/{diff.num_detections} | {t_torch:.2f} | {t_program:.2f} | {t_export:.0f} |"
                          + ("" if diff.ok else " FAILED"), flush=True)
    print("\n".join(limits))
    print("all checks passed" if not failures else f"{failures} check(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
