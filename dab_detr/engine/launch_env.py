"""Join a job whose processes were started by torchrun or SLURM's srun, instead of spawning them.

Detectron2's ``launch`` spawns one process per GPU itself (``--num-gpus G``). Cluster launchers
start every process themselves and describe the job in environment variables:

- torchrun (and submitit's ``TorchDistributedEnvironment``): ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
- srun (one task per GPU): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``,
  ``SLURM_NODEID``, ``SLURM_NNODES`` and the node list ``SLURM_NODELIST`` (``SLURM_STEP_*``
  when srun runs a step on part of the allocation). The rendezvous host is the first node of
  the list (expanded by ``scontrol show hostnames`` when it exists, else by submitit's parser),
  the port is ``MASTER_PORT`` if set, else derived from ``SLURM_JOB_ID`` (the same in every task).

torchrun's variables win when both are present (torchrun inside an srun allocation). A launcher
that started a single process leaves the work to Detectron2's ``launch`` (``--num-gpus G`` in an
sbatch script with one task). ``launch_main`` then sets up the process group exactly as
Detectron2's ``_distributed_worker`` does (NCCL with CUDA, else gloo; the per-machine group of
``comm.create_local_process_group``; ``torch.cuda.set_device(local_rank)``), so
``comm.get_rank()``, ``get_local_rank()``, ``get_world_size()`` and the trainer work unchanged.
"""
import dataclasses
import logging
import os
import shutil
import subprocess
from datetime import timedelta
from typing import Callable, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from detectron2.engine import default_argument_parser, launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

__all__ = ["LaunchEnvironment", "detect_launch_environment", "expand_slurm_nodelist",
           "init_distributed", "launch_main", "slurm_master_port"]

logger = logging.getLogger(__name__)

_TORCHRUN_REQUIRED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_SLURM_REQUIRED = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
# a port per SLURM job, in the range submitit also uses for its MASTER_PORT
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 20000, 40000


@dataclasses.dataclass(frozen=True)
class LaunchEnvironment:
    """One process's place in a job started by an external launcher.

    Ranks are numbered node by node: ``rank == node_rank * local_world_size + local_rank``
    (what ``comm.create_local_process_group`` assumes)."""

    launcher: str  # "torchrun" (RANK/WORLD_SIZE/... variables) or "slurm" (SLURM_* variables)
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int

    @property
    def dist_url(self) -> str:
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr  # IPv6
        return f"tcp://{host}:{self.master_port}"

    def describe(self) -> str:
        source = {"torchrun": "RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (torchrun, submitit)",
                  "slurm": "SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_NODELIST (srun)"}[self.launcher]
        return (f"{source}: {self.world_size} processes on {self.num_nodes} node(s), "
                f"{self.local_world_size} per node; this is rank {self.rank} (local rank "
                f"{self.local_rank}, node {self.node_rank}); rendezvous {self.dist_url}")


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _first_int(environ: Mapping[str, str], names: Sequence[str], default: Optional[int] = None) -> int:
    for name in names:
        if environ.get(name, "") != "":
            return _int(environ, name)
    if default is None:
        raise ValueError(f"none of the environment variables {', '.join(names)} is set")
    return default


def slurm_master_port(job_id: str) -> int:
    """The rendezvous port of a SLURM job without ``MASTER_PORT``: the same in all its tasks."""
    digits = "".join(c for c in str(job_id) if c.isdigit())
    if not digits:
        raise ValueError(f"SLURM_JOB_ID={job_id!r} has no digits; set MASTER_PORT for the rendezvous")
    return _SLURM_PORT_BASE + int(digits) % _SLURM_PORT_SPAN


def expand_slurm_nodelist(nodelist: str) -> List[str]:
    """``"gpu[01-02,07],login1"`` -> ``["gpu01", "gpu02", "gpu07", "login1"]``.

    Uses ``scontrol show hostnames`` when SLURM's tools are installed, else submitit's parser
    (the ``cluster`` extra); a single plain host name needs neither."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("SLURM_NODELIST is empty")
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=60)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
        logger.warning("scontrol show hostnames %s failed (%s); parsing it with submitit",
                       nodelist, out.stderr.strip())
    if not any(c in nodelist for c in "[],"):
        return [nodelist]
    try:
        from submitit.slurm.slurm import _parse_node_list
    except ImportError:
        raise RuntimeError(
            f"cannot expand SLURM_NODELIST={nodelist!r}: no scontrol on this machine and submitit is "
            "not installed (pip install -e '.[cluster]'), or set MASTER_ADDR to the first node") from None
    return _parse_node_list(nodelist)


def _from_torchrun(environ: Mapping[str, str]) -> LaunchEnvironment:
    rank, world_size, local_rank = (_int(environ, k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    local_world_size = _first_int(environ, ["LOCAL_WORLD_SIZE"], default=world_size)
    if local_world_size < 1 or world_size % local_world_size:
        raise ValueError(f"WORLD_SIZE={world_size} is not a multiple of LOCAL_WORLD_SIZE={local_world_size}: "
                         "Detectron2 needs the same number of processes on every node")
    node_rank = _first_int(environ, ["GROUP_RANK"], default=rank // local_world_size)
    return LaunchEnvironment("torchrun", rank, world_size, local_rank, local_world_size, node_rank,
                             world_size // local_world_size, environ["MASTER_ADDR"],
                             _int(environ, "MASTER_PORT"))


def _from_slurm(environ: Mapping[str, str]) -> LaunchEnvironment:
    rank, local_rank = _int(environ, "SLURM_PROCID"), _int(environ, "SLURM_LOCALID")
    # the step's values (srun on part of the allocation) before the job's
    world_size = _first_int(environ, ["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"])
    num_nodes = _first_int(environ, ["SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"], default=1)
    if num_nodes < 1 or world_size % num_nodes:
        raise ValueError(f"SLURM runs {world_size} tasks on {num_nodes} nodes: Detectron2 needs the same "
                         "number of tasks on every node (srun --ntasks-per-node G)")
    local_world_size = world_size // num_nodes
    node_rank = _first_int(environ, ["SLURM_NODEID"], default=rank // local_world_size)
    if environ.get("MASTER_ADDR"):
        master_addr = environ["MASTER_ADDR"]
    else:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_NODELIST") \
            or environ.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise ValueError("SLURM_NODELIST is not set: cannot find the rendezvous host (or set MASTER_ADDR)")
        master_addr = expand_slurm_nodelist(nodelist)[0]
    if environ.get("MASTER_PORT"):
        master_port = _int(environ, "MASTER_PORT")
    elif environ.get("SLURM_JOB_ID"):
        master_port = slurm_master_port(environ["SLURM_JOB_ID"])
    else:
        raise ValueError("neither MASTER_PORT nor SLURM_JOB_ID is set: cannot choose the rendezvous port")
    return LaunchEnvironment("slurm", rank, world_size, local_rank, local_world_size, node_rank,
                             num_nodes, master_addr, master_port)


def detect_launch_environment(environ: Mapping[str, str] = None) -> Optional[LaunchEnvironment]:
    """The job described by torchrun's or srun's variables in ``environ`` (default ``os.environ``),
    or None when neither launcher started this process. Raises ValueError naming the variable
    when they are incomplete or inconsistent."""
    environ = os.environ if environ is None else environ
    if all(environ.get(k, "") != "" for k in _TORCHRUN_REQUIRED):
        env = _from_torchrun(environ)
    elif all(environ.get(k, "") != "" for k in _SLURM_REQUIRED):
        env = _from_slurm(environ)
    else:
        partial = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if environ.get(k, "") != ""]
        if partial:
            missing = [k for k in _TORCHRUN_REQUIRED if environ.get(k, "") == ""]
            raise ValueError(f"{', '.join(partial)} set but {', '.join(missing)} missing: "
                             "start the processes with torchrun, or unset these variables")
        return None
    checks = [(0 <= env.rank < env.world_size, "rank", "world size"),
              (0 <= env.local_rank < env.local_world_size, "local rank", "processes per node"),
              (0 <= env.node_rank < env.num_nodes, "node rank", "nodes")]
    for ok, what, of in checks:
        if not ok:
            raise ValueError(f"{env.launcher}: {what} out of range for the {of} ({env.describe()})")
    if env.rank != env.node_rank * env.local_world_size + env.local_rank:
        raise ValueError(f"{env.launcher}: rank {env.rank} is not node {env.node_rank} x "
                         f"{env.local_world_size} + local rank {env.local_rank}: ranks must be numbered "
                         "node by node (for srun: --distribution=block, the default)")
    return env


def init_distributed(env: LaunchEnvironment, timeout: timedelta = DEFAULT_TIMEOUT) -> None:
    """Join the process group of ``env`` as Detectron2's ``_distributed_worker`` does: NCCL
    with CUDA (and ``torch.cuda.set_device(local_rank)``), else gloo; then the per-machine group."""
    has_gpu = torch.cuda.is_available()
    if has_gpu and env.local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"local rank {env.local_rank} but this process sees {torch.cuda.device_count()} CUDA device(s): "
            "Detectron2 uses GPU <local rank>, so every process must see all GPUs of its node "
            "(no per-task GPU binding such as srun --gpus-per-task=1 / --gpu-bind)")
    dist.init_process_group(backend="NCCL" if has_gpu else "GLOO", init_method=env.dist_url,
                            world_size=env.world_size, rank=env.rank, timeout=timeout)
    comm.create_local_process_group(env.local_world_size)
    if has_gpu:
        torch.cuda.set_device(env.local_rank)
    comm.synchronize()


def _check_no_spawn_arguments(args, env: LaunchEnvironment) -> None:
    defaults = default_argument_parser()
    conflicts = [f"--{name.replace('_', '-')} {getattr(args, name)}"
                 for name in ("num_gpus", "num_machines", "machine_rank", "dist_url")
                 if getattr(args, name, defaults.get_default(name)) != defaults.get_default(name)]
    if conflicts:
        raise SystemExit(f"This process was started by {env.launcher} as one of {env.world_size} "
                         f"({env.describe()}); {', '.join(conflicts)} would start or place processes "
                         "a second time: drop it (the launcher decides the processes and the rendezvous)")


def launch_main(main_func: Callable, args, environ: Mapping[str, str] = None):
    """Run ``main_func(args)`` in a job started by torchrun/srun, or else through Detectron2's
    ``launch`` with ``--num-gpus/--num-machines/--machine-rank/--dist-url`` as before."""
    env = detect_launch_environment(environ)
    if env is None or env.world_size == 1:
        if env is not None:
            setup_logger(name=__name__).info(
                "The launcher started 1 process (%s): Detectron2's launch starts --num-gpus %d",
                env.describe(), args.num_gpus)
        return launch(main_func, args.num_gpus, num_machines=args.num_machines,
                      machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
    _check_no_spawn_arguments(args, env)
    setup_logger(name=__name__, distributed_rank=env.rank).info("Joining the job described by %s",
                                                                env.describe())
    init_distributed(env)
    return main_func(args)
