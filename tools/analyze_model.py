#!/usr/bin/env python
"""Print the parameter count and GFLOPs of a LazyConfig model at a given input size.

    python tools/analyze_model.py --config-file configs/dab_detr_r50_dc5.py --height 800 --width 1333
    python tools/analyze_model.py --config-file configs/dab_detr_r50.py model.transformer.num_patterns=3

FLOPs are fvcore's (one fused multiply-add = one FLOP) for the inference forward of one random
image, attention products included; see ``dab_detr.analysis``. The weights are random: the count
does not depend on them; a ``train.init_checkpoint=PATH`` given on the command line is loaded all
the same (a missing or misfitting file is an error).
"""
import argparse
import logging
import sys

from detectron2.config import LazyConfig, instantiate

from dab_detr.analysis import analyze_model, format_stats
from dab_detr.checkpoint import load_command_line_weights
from dab_detr.predictor import load_lazy_config
from dab_detr.user_errors import exit_on_user_errors


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a LazyConfig .py file defining `model`")
    parser.add_argument("--height", type=int, default=800, help="input image height in pixels (default 800)")
    parser.add_argument("--width", type=int, default=1333, help="input image width in pixels (default 1333)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, key=value (e.g. model.num_queries=100)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with exit_on_user_errors():  # a missing or unreadable config or checkpoint: one line naming it
        cfg = load_lazy_config(args.config_file)
        if "model" not in cfg:
            sys.exit(f"analyze_model: {args.config_file} defines no `model`; it has {sorted(cfg.keys())}")
        cfg = LazyConfig.apply_overrides(cfg, args.opts)
        if args.height < 1 or args.width < 1:
            sys.exit(f"analyze_model: --height and --width must be positive, got {args.height} x {args.width}")
        logging.basicConfig(level=logging.WARNING)
        model = instantiate(cfg.model)
        load_command_line_weights(model, args.opts)
    print(f"config: {args.config_file}")
    print(format_stats(analyze_model(model, args.height, args.width)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
