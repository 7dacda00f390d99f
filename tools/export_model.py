#!/usr/bin/env python
"""Export a DAB-DETR / DAB-Deformable-DETR config to a verified ONNX or torch.export file.

    python tools/export_model.py --config-file configs/dab_detr_r50.py --format onnx \\
        --output output/dab_detr_r50.onnx train.init_checkpoint=output/dab_detr_r50.pth
    python tools/export_model.py --config-file configs/dab_deformable_detr_r50.py \\
        --format torch_export --output output/dab_deformable_detr_r50.pt2 train.init_checkpoint=...

The program takes ``image`` [1, 3, H, W] float32 in 0..255 in the config's pixel format
(``model.input_format``; H, W dynamic) and returns ``boxes`` [K, 4] (x0, y0, x1, y1 in input
pixels), ``scores`` [K] and ``labels`` [K] (int64 class ids). Before the file is written, it is
run on the sample input and on a second input of another size and compared with PyTorch; a file
that disagrees is not written. Weights come from ``train.init_checkpoint`` (loaded by
``DABDETRCheckpointer``); ``--random-weights`` skips loading (for testing the export itself).
"""
import argparse
import logging
import sys
import time

from detectron2.config import instantiate

from dab_detr.checkpoint import DABDETRCheckpointer
from dab_detr.export import (DEFAULT_OPSET, FORMATS, ExportMismatchError, MissingExportDependencyError,
                             NotExportableError, OutputPathError, export_detector)
from dab_detr.predictor import load_lazy_config
from dab_detr.user_errors import exit_on_user_errors


def build_detector(config_file, opts, random_weights):
    """The config's model on CPU in eval mode, with ``train.init_checkpoint`` loaded unless ``random_weights``."""
    cfg = load_lazy_config(config_file, opts)
    model = instantiate(cfg.model).eval()
    if not random_weights:
        weights = cfg.train.get("init_checkpoint", "")
        if not weights:
            raise SystemExit(f"{config_file}: no weights to export; add train.init_checkpoint=/path/to/model.pth "
                             f"(or --random-weights to test the export with random weights)")
        DABDETRCheckpointer(model).load(weights)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True, help="file to write (.onnx / .pt2)")
    parser.add_argument("--sample-size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"),
                        help="size of the image traced with (H and W stay dynamic); default 480 640")
    parser.add_argument("--check-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="size of the second check image; default: the sample size transposed")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--random-weights", action="store_true", help="do not load train.init_checkpoint")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    with exit_on_user_errors():  # a missing or unreadable config or checkpoint: one line naming it
        model = build_detector(args.config_file, args.opts, args.random_weights)
    start = time.perf_counter()
    try:
        report = export_detector(model, args.format, args.output, sample_size=tuple(args.sample_size),
                                 check_size=tuple(args.check_size) if args.check_size else None, opset=args.opset)
    except (NotExportableError, OutputPathError, MissingExportDependencyError, ExportMismatchError) as e:
        print(f"error: {args.config_file}: {e}", file=sys.stderr)
        return 1
    print(report)
    print(f"input format {model.input_format}; export and checks took {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
