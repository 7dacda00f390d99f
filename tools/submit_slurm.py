#!/usr/bin/env python
"""Submit a DAB-DETR training (or ``--eval-only``) job to SLURM through submitit.

    python tools/submit_slurm.py --config-file configs/dab_detr_r50.py \\
        --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 [--account A] [--qos Q] \\
        train.output_dir=/shared/runs/dab_detr_r50

Each of the ``nodes x gpus-per-node`` tasks runs ``tools/lazyconfig_train_net.py`` with the same
config file, ``--eval-only``/``--resume`` and ``key=value`` overrides. submitit's job files and
the tasks' logs go to ``--job-dir`` (default ``<train.output_dir>/submitit``). On preemption
(SIGTERM) or before the time limit (submitit's signal, ``--signal-delay-s`` seconds before), the
job saves a checkpoint after the current iteration, requeues itself and resumes from it
(``dab_detr.engine.submitit_job``). ``--cluster local`` runs the same job on this machine with
submitit's ``LocalExecutor`` (one process per "GPU", CPU processes without a GPU): for testing.
Needs submitit (``pip install -e '.[cluster]'``).
"""
import argparse
import os
import re
import sys

from detectron2.config import LazyConfig

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lazyconfig_train_net.py")


def parse_time_minutes(text: str) -> int:
    """SLURM's --time formats: minutes, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``. Returns minutes (rounded up)."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"--time {text!r}: use minutes, HH:MM:SS or D-HH:MM:SS")
    days, first, second, third = match.groups()
    if days is None and second is None:  # "90": minutes
        return int(first)
    if days is None and third is None:  # "MM:SS"
        hours, minutes, seconds = 0, int(first), int(second)
    else:
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
    total_seconds = ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
    return max(1, -(-total_seconds // 60))


def _key_value(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--slurm-option {text!r}: expected KEY=VALUE (e.g. constraint=a100)")
    key, value = text.split("=", 1)
    return key.replace("-", "_"), value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig file")
    parser.add_argument("--eval-only", action="store_true", help="evaluate train.init_checkpoint")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of train.output_dir")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="also the number of tasks per node")
    parser.add_argument("--cpus-per-task", type=int, default=8, help="data-loader workers + 1 is a good value")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--time", type=parse_time_minutes, default="24:00:00",
                        help="time limit: minutes, HH:MM:SS or D-HH:MM:SS (default 24:00:00)")
    parser.add_argument("--mem", help="memory per node, as SLURM's --mem (e.g. 200G; 0 = all)")
    parser.add_argument("--account", help="SLURM account")
    parser.add_argument("--qos", help="SLURM quality of service")
    parser.add_argument("--slurm-option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="any other sbatch option, e.g. constraint=a100 (repeatable)")
    parser.add_argument("--job-name", default="dab_detr")
    parser.add_argument("--job-dir", help="submitit folder (default: <train.output_dir>/submitit)")
    parser.add_argument("--signal-delay-s", type=int, default=120,
                        help="seconds before the time limit at which the job checkpoints and requeues")
    parser.add_argument("--max-num-timeout", type=int, default=10,
                        help="how many times a job that reaches its time limit is requeued (preemptions: always)")
    parser.add_argument("--cluster", choices=["slurm", "local"], default="slurm",
                        help="local: run the job on this machine with submitit's LocalExecutor (testing)")
    parser.add_argument("--wait", action="store_true", help="wait for the job to end and report how it ended")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    return parser


def _import_submitit():
    try:
        import submitit
        from dab_detr.engine.submitit_job import TrainingJob
    except ImportError as e:
        raise SystemExit(f"tools/submit_slurm.py needs submitit ({e}): pip install -e '.[cluster]'") from None
    return submitit, TrainingJob


def _executor(submitit, args, job_dir):
    tasks_per_node = max(args.gpus_per_node, 1)
    if args.cluster == "local":
        if args.nodes != 1:
            raise SystemExit(f"--cluster local runs on this machine only: --nodes {args.nodes} must be 1")
        executor = submitit.LocalExecutor(folder=job_dir, max_num_timeout=args.max_num_timeout)
        executor.update_parameters(timeout_min=args.time, tasks_per_node=tasks_per_node,
                                   gpus_per_node=args.gpus_per_node, signal_delay_s=args.signal_delay_s,
                                   stderr_to_stdout=True)
        return executor
    try:
        executor = submitit.SlurmExecutor(folder=job_dir, max_num_timeout=args.max_num_timeout)
    except RuntimeError as e:
        raise SystemExit(f"cannot submit to SLURM from this machine ({e}); "
                         "--cluster local runs the job here instead") from None
    parameters = dict(job_name=args.job_name, nodes=args.nodes, ntasks_per_node=tasks_per_node,
                      gpus_per_node=args.gpus_per_node or None, cpus_per_task=args.cpus_per_task,
                      time=args.time, signal_delay_s=args.signal_delay_s, stderr_to_stdout=True,
                      partition=args.partition, mem=args.mem, account=args.account, qos=args.qos)
    parameters = {k: v for k, v in parameters.items() if v is not None}
    if args.slurm_option:
        parameters["additional_parameters"] = dict(args.slurm_option)
    executor.update_parameters(**parameters)
    return executor


def job_arguments(args):
    """The job's command line for tools/lazyconfig_train_net.py and its output directory (absolute)."""
    config_file = os.path.abspath(args.config_file)
    if not os.path.isfile(config_file):
        raise SystemExit(f"--config-file {args.config_file}: no such file")
    opts = [o for o in args.opts if o != "--"]
    cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), opts)
    output_dir = os.path.abspath(cfg.train.output_dir)
    if args.eval_only and not cfg.train.get("init_checkpoint", ""):
        raise SystemExit("--eval-only needs weights: add train.init_checkpoint=/path/to/model.pth")
    argv = ["--config-file", config_file]
    argv += ["--eval-only"] if args.eval_only else []
    argv += ["--resume"] if args.resume else []
    return argv + opts + [f"train.output_dir={output_dir}"], output_dir


def submit(args):
    """Submit the job described by ``args`` (see ``build_parser``); returns the submitit job."""
    submitit, TrainingJob = _import_submitit()
    argv, output_dir = job_arguments(args)
    job_dir = os.path.abspath(args.job_dir or os.path.join(output_dir, "submitit"))
    executor = _executor(submitit, args, job_dir)
    os.makedirs(output_dir, exist_ok=True)
    job = executor.submit(TrainingJob(TRAIN_SCRIPT, argv))
    tasks = args.nodes * max(args.gpus_per_node, 1)
    print(f"Submitted job {job.job_id} ({args.cluster}, {args.nodes} node(s) x {max(args.gpus_per_node, 1)} "
          f"task(s) = {tasks} processes): {'evaluation' if args.eval_only else 'training'} of "
          f"{args.config_file} into {output_dir}", flush=True)
    print(f"Logs: {job_dir}/{job.job_id}_<task>_log.out (task 0 has the training log)", flush=True)
    return job


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    job = submit(args)
    if not args.wait:
        return 0
    job.wait()
    try:
        job.results()
    except Exception as e:  # submitit re-raises the job's failure: report it, exit non-zero
        print(f"Job {job.job_id} failed: {e}", file=sys.stderr)
        return 1
    print(f"Job {job.job_id} finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
