#!/usr/bin/env python
"""Train or evaluate DAB-DETR with a LazyConfig, on one or many GPUs/machines (or CPU processes).

    python tools/lazyconfig_train_net.py --config-file configs/dab_detr_r50.py --num-gpus 8
    python tools/lazyconfig_train_net.py --config-file configs/dab_detr_r50.py --eval-only \\
        train.init_checkpoint=output/dab_detr_r50.pth
    python tools/lazyconfig_train_net.py --config-file configs/dab_detr_r50.py --num-gpus 8 --resume

Multi-machine: add ``--num-machines N --machine-rank R --dist-url tcp://HOST:PORT`` on every
machine, or start every process with ``torchrun --nnodes N --nproc-per-node G`` or SLURM's
``srun`` (one task per GPU): the script then joins their job (``dab_detr.engine.launch_env``).
Without a GPU, ``--num-gpus K`` starts K CPU processes (gloo backend). Any config key can be
overridden with ``key=value`` (e.g. ``train.max_iter=1000 dataloader.train.total_batch_size=8``).
The trainer lives in ``dab_detr.engine``; this script only parses arguments and launches.
"""
import logging

from detectron2.config import instantiate
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from dab_detr.checkpoint import CheckpointError, DABDETRCheckpointer
from dab_detr.config_checks import ConfigError, load_checked_config
from dab_detr.cpu_allocator import configure_cpu_allocator
from dab_detr.engine import LazyConfigTrainer, ModelEMA, resolve_device
from dab_detr.engine.launch_env import launch_main
from dab_detr.precision import PrecisionError, resolve_precision

logger = logging.getLogger("dab_detr")


def evaluate(cfg):
    """``--eval-only``: load ``train.init_checkpoint`` (and its EMA weights when the config
    enables EMA) and evaluate on ``dataloader.test``."""
    device = resolve_device(cfg.train.get("device", None))
    resolve_precision(cfg.train.get("precision", "fp32"), device, "train.precision")  # fails before loading
    model = instantiate(cfg.model).to(device)
    try:
        extra = DABDETRCheckpointer(model).load(cfg.train.init_checkpoint)
    except CheckpointError as e:  # a checkpoint that does not fit: the message says why and the fix
        raise SystemExit(f"error: {e}") from None
    ema = None
    if cfg.train.get("model_ema", {}).get("enabled", False) and "model_ema" in (extra or {}):
        ema = ModelEMA(model)
        ema.load_state_dict(extra["model_ema"])
        logger.info("Evaluating the EMA weights of %s", cfg.train.init_checkpoint)
    return LazyConfigTrainer.test(cfg, model, ema=ema)


def main(args):
    try:  # unknown keys / arguments: a message naming them and the nearest ones, no traceback
        cfg = load_checked_config(args.config_file, args.opts)
    except ConfigError as e:
        message = str(e) if args.config_file in str(e) else f"{args.config_file}: {e}"
        raise SystemExit(f"error: {message}") from None
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="dab_detr")
    try:  # in every process: freed CPU memory kept for reuse (dab_detr/cpu_allocator.py)
        configure_cpu_allocator()
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.eval_only:
        if not cfg.train.init_checkpoint:
            raise SystemExit("--eval-only needs weights: add train.init_checkpoint=/path/to/model.pth")
        try:  # e.g. train.precision=fp16 on a CPU: one line naming the setting
            return evaluate(cfg)
        except PrecisionError as e:
            raise SystemExit(f"error: {e}") from None
    try:
        trainer = LazyConfigTrainer(cfg)
    except PrecisionError as e:
        raise SystemExit(f"error: {e}") from None
    try:  # a missing or unfitting train.init_checkpoint: one line naming it
        trainer.resume_or_load(resume=args.resume)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    results = trainer.train()
    if comm.is_main_process():
        logger.info("Checkpoints and metrics are in %s", cfg.train.output_dir)
    return results


if __name__ == "__main__":
    # as one process of a torchrun / srun job, or Detectron2's launch with --num-gpus etc.
    launch_main(main, default_argument_parser().parse_args())
