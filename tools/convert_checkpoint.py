#!/usr/bin/env python
"""Convert a released DAB-DETR checkpoint into one that this project loads.

    python tools/convert_checkpoint.py --source original checkpoint.pth output/dab_detr_r50.pth
    python tools/convert_checkpoint.py --source hf model.safetensors output/dab_detr_r50_hf.pth
    python tools/convert_checkpoint.py --source detrex dab_detr_r50_50ep.pth output/dab_detr_r50_detrex.pth
    python tools/convert_checkpoint.py --source mmdet dab-detr_r50_8xb2-50e_coco_20221122_120837-c1035c8c.pth \\
        output/dab_detr_r50_mmdet.pth
    python tools/convert_checkpoint.py --source dn-detr checkpoint.pth output/dn_dab_detr_r50.pth  # DN-DETR

It prints the exact command that evaluates the result: the config that builds the checkpoint's
model plus the overrides for every setting the checkpoint saves that the config does not have
(queries, patterns, classes, DC5, image position-embedding temperature), e.g.

    python tools/lazyconfig_train_net.py --config-file configs/dab_detr_r50.py --eval-only \\
        train.init_checkpoint=output/dab_detr_r50.pth

Every tensor of the input is accounted for: unmapped, missing or mis-shaped keys stop the
conversion with a list of them; keys a layout drops on purpose are listed with the reason.
``--config`` additionally checks the result against the model that config builds.
"""
import argparse
import os
import sys

from dab_detr.checkpoint import LAYOUTS, SOURCES, CheckpointError, convert_checkpoint_file
from dab_detr.checkpoint.fit_check import compare_state_dicts, explain_misfit
from dab_detr.predictor import load_lazy_config
from dab_detr.user_errors import InputFileError, exit_on_user_errors, file_problem, output_problem


def _check_against_config(state_dict, config_file, overrides):
    """The converted weights against the model ``config_file`` builds (on the meta device: no
    memory), with the checkpoint-fit check's message (keys, likely cause, fix)."""
    import torch
    from detectron2.config import instantiate

    with torch.device("meta"):
        model = instantiate(load_lazy_config(config_file, overrides).model).state_dict()
    report = compare_state_dicts(state_dict, model)
    if report.missing or report.unexpected or report.mismatched:
        name = f"{config_file} {' '.join(overrides)}".strip()
        raise CheckpointError(explain_misfit(report, state_dict, model, "(converted)", f"model of {name}"))


def convert(args):
    """Convert ``args.input``, check it against ``args.config`` if given, write ``args.output``."""
    problem = output_problem(args.output)
    if problem:  # before the conversion, not after it
        raise InputFileError(f"output {args.output} {problem}")
    problem = args.config and file_problem(args.config)
    if problem:
        raise InputFileError(f"config file {args.config} {problem}")
    result = convert_checkpoint_file(args.input, None, args.source)
    if args.config:
        _check_against_config(result.state_dict, args.config, result.overrides)
    import torch

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save(result.checkpoint(args.input), args.output)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, choices=SOURCES,
                        help="who released the checkpoint: " + "; ".join(f"{n}: {l.description}" for n, l in LAYOUTS.items()))
    parser.add_argument("input", help="checkpoint to convert (.pth, .bin or .safetensors)")
    parser.add_argument("output", help="where to write the converted checkpoint (.pth)")
    parser.add_argument("--config", help="optionally check the result against the model this LazyConfig builds "
                                         "(with the overrides the converter finds)")
    args = parser.parse_args(argv)
    with exit_on_user_errors():  # a missing or unreadable input, config or output: one line naming it
        result = convert(args)
    v = result.variant
    print(f"converted {len(result.state_dict)} tensors from {args.input} ({args.source} layout) to {args.output}")
    for note in result.notes:
        print(f"  {note}")
    print(f"model: {v.backbone}, {v.num_queries} queries, {v.num_patterns} patterns, {v.num_classes} classes")
    print("evaluate it with:")
    print(f"  {result.command(args.output)}")
    if v.dilation is None and v.backbone in ("R50", "R101") and v.family == "":
        print("  note: DC5 and plain models have the same weights and this file does not say which it is; the config "
              "above was chosen from the file name. Use a *_dc5* config for DC5 checkpoints.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
