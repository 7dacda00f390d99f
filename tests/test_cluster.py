"""Clusters: tools/lazyconfig_train_net.py as the processes of torchrun and of (simulated) srun,
and tools/submit_slurm.py through submitit's LocalExecutor with a preemption mid-training.

The multi-process runs train the demo config (configs/dab_detr_demo.py) shrunk by overrides on a
generated copy of the demo dataset with 8 training images (its manifest records what was
generated, so the processes use it as it is). All runs use gloo on CPU.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from detectron2.config import LazyConfig
from detectron2.engine import HookBase, default_argument_parser
from detectron2.utils import comm

from conftest import REPO, load_tool
from dab_detr.data import demo_dataset
from dab_detr.engine import LazyConfigTrainer
from dab_detr.engine.launch_env import (LaunchEnvironment, detect_launch_environment, expand_slurm_nodelist,
                                        init_distributed, launch_main, slurm_master_port)
from dab_detr.engine.preemption import (PreemptionCheckpointHook, PreemptionHandler, TrainingPreempted,
                                        active_preemption_handler, preemption_hooks)
from test_custom_data import write_user_config

DEMO_CONFIG = os.path.join(REPO, "configs", "dab_detr_demo.py")
TRAIN_NET = os.path.join(REPO, "tools", "lazyconfig_train_net.py")
# the demo shrunk: 2 images per step (1 per process), no resizing (images are ~160 px), 2 decoder
# layers, no data-loader workers; checkpoints after iterations 1 and 3 (= model_final)
SMALL_DEMO = ["train.device=cpu", "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
              "dataloader.train.mapper.augmentation=[]", "model.transformer.num_decoder_layers=2",
              "train.log_period=1", "train.checkpointer.period=2"]
MAX_ITER = 4
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                  "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo_dataset, "_SPLITS", {"train": (8, 1), "val": (2, 2)})
        demo_dataset.ensure_demo_dataset(str(root / "dab_demo"))
    return str(root)


def _clean_env(datasets_root, **extra):
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", DETECTRON2_DATASETS=datasets_root, **extra)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_is_free(port):
    with socket.socket() as s:
        try:
            s.bind(("", port))
            return True
        except OSError:
            return False


def _train_args(output_dir):
    return ["--config-file", DEMO_CONFIG] + SMALL_DEMO + [f"train.output_dir={output_dir}", f"train.max_iter={MAX_ITER}"]


def _check(result, what):
    assert result.returncode == 0, f"{what} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _weights(output_dir):
    first, final = (_load(os.path.join(output_dir, n)) for n in ("model_0000001.pth", "model_final.pth"))
    assert first["iteration"] == 1 and final["iteration"] == MAX_ITER - 1
    return first["model"], final["model"]


def _assert_same_weights(actual, expected):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=0, rtol=0, msg=key)


@pytest.fixture(scope="module")
def detectron2_two_processes(datasets_root, tmp_path_factory):
    """The reference: Detectron2's own launcher, ``--num-gpus 2`` (2 gloo processes)."""
    out = str(tmp_path_factory.mktemp("num_gpus_2"))
    cmd = [sys.executable, TRAIN_NET, "--num-gpus", "2", "--dist-url", f"tcp://127.0.0.1:{_free_port()}"]
    _check(subprocess.run(cmd + _train_args(out), cwd=REPO, env=_clean_env(datasets_root),
                          capture_output=True, text=True, timeout=600), "--num-gpus 2")
    first, final = _weights(out)
    moved = max((final[k] - first[k]).abs().max().item() for k in final if final[k].dtype.is_floating_point)
    assert moved > 1e-4  # two more steps moved the weights: equality below is not trivial
    return final


def test_torchrun_processes_equal_detectron2_launch(datasets_root, detectron2_two_processes, tmp_path):
    out = str(tmp_path / "torchrun")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", TRAIN_NET]
    result = subprocess.run(cmd + _train_args(out), cwd=REPO, env=_clean_env(datasets_root),
                            capture_output=True, text=True, timeout=600)
    _check(result, "torchrun")
    log = result.stdout + result.stderr
    assert len(re.findall(r"Joining the job described by RANK/WORLD_SIZE.*: 2 processes on 1 node\(s\), "
                          r"2 per node; this is rank 0", log)) == 1  # logged once (by rank 0)
    assert "this is rank 1" not in log
    assert os.path.isfile(os.path.join(out, "log.txt.rank1"))  # the second process trained too
    _assert_same_weights(_weights(out)[1], detectron2_two_processes)


def test_simulated_srun_tasks_equal_detectron2_launch(datasets_root, detectron2_two_processes, tmp_path):
    """What ``srun --nodes 1 --ntasks-per-node 2`` sets in each task (no MASTER_ADDR/PORT: the first
    host of the node list and a port derived from the job id)."""
    job_id = next(j for j in range(31337, 41337) if _port_is_free(slurm_master_port(str(j))))
    out = str(tmp_path / "srun")
    common = dict(SLURM_JOB_ID=str(job_id), SLURM_JOBID=str(job_id), SLURM_JOB_NAME="dab_detr",
                  SLURM_NTASKS="2", SLURM_NPROCS="2", SLURM_NNODES="1", SLURM_JOB_NUM_NODES="1",
                  SLURM_NODEID="0", SLURM_NODELIST="localhost", SLURM_JOB_NODELIST="localhost",
                  SLURM_NTASKS_PER_NODE="2", SLURM_TASKS_PER_NODE="2", SLURM_STEP_ID="0",
                  SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="1", SLURM_STEP_NODELIST="localhost",
                  SLURM_STEP_TASKS_PER_NODE="2", SLURMD_NODENAME="localhost", SLURM_CPUS_PER_TASK="1")
    procs = [subprocess.Popen([sys.executable, TRAIN_NET] + _train_args(out), cwd=REPO,
                              env=_clean_env(datasets_root, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                                             **common),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=600)[0])
        finally:
            proc.kill()
        assert proc.returncode == 0, logs[-1][-5000:]
    assert f"SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_NODELIST (srun): 2 processes on 1 node(s), 2 per " \
           f"node; this is rank 0 (local rank 0, node 0); rendezvous tcp://localhost:{slurm_master_port(str(job_id))}" \
           in logs[0]
    assert "Joining" not in logs[1]  # logged once
    _assert_same_weights(_weights(out)[1], detectron2_two_processes)


# ------------------------------------------------------------------ detection (no processes)
TORCHRUN_NODE1 = dict(RANK="11", WORLD_SIZE="16", LOCAL_RANK="3", LOCAL_WORLD_SIZE="8", GROUP_RANK="1",
                      MASTER_ADDR="gpu01", MASTER_PORT="29500")
SRUN_NODE1 = dict(SLURM_PROCID="9", SLURM_NTASKS="16", SLURM_LOCALID="1", SLURM_NODEID="1", SLURM_NNODES="2",
                  SLURM_NODELIST="gpu[07-08]", SLURM_JOB_ID="4242", SLURM_NTASKS_PER_NODE="8")


def test_detects_torchrun_and_srun_variables():
    assert detect_launch_environment({}) is None
    assert detect_launch_environment({"PATH": "/bin"}) is None
    assert detect_launch_environment(TORCHRUN_NODE1) == LaunchEnvironment(
        "torchrun", rank=11, world_size=16, local_rank=3, local_world_size=8, node_rank=1, num_nodes=2,
        master_addr="gpu01", master_port=29500)
    env = detect_launch_environment(SRUN_NODE1)
    assert env == LaunchEnvironment("slurm", rank=9, world_size=16, local_rank=1, local_world_size=8,
                                    node_rank=1, num_nodes=2, master_addr="gpu07",
                                    master_port=slurm_master_port("4242"))
    assert env.dist_url == f"tcp://gpu07:{20000 + 4242}"
    # MASTER_ADDR / MASTER_PORT given by the user's sbatch script win
    env = detect_launch_environment(dict(SRUN_NODE1, MASTER_ADDR="10.0.0.7", MASTER_PORT="12345"))
    assert (env.master_addr, env.master_port) == ("10.0.0.7", 12345)
    # torchrun inside an allocation: torchrun's variables win
    assert detect_launch_environment(dict(SRUN_NODE1, **TORCHRUN_NODE1)).launcher == "torchrun"
    # a step on part of the allocation: the step's task and node counts
    step = dict(SRUN_NODE1, SLURM_NTASKS="32", SLURM_NNODES="4", SLURM_NODELIST="gpu[01-04]",
                SLURM_STEP_NUM_TASKS="16", SLURM_STEP_NUM_NODES="2", SLURM_STEP_NODELIST="gpu[03-04]")
    env = detect_launch_environment(step)
    assert (env.world_size, env.num_nodes, env.master_addr) == (16, 2, "gpu03")
    # single-task job step without SLURM_NODEID: node from the rank
    env = detect_launch_environment(dict(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0",
                                         SLURM_NODELIST="node5", SLURM_JOB_ID="77"))
    assert (env.world_size, env.num_nodes, env.master_addr, env.master_port) == (1, 1, "node5", 20077)


def test_nodelist_expansion():
    assert expand_slurm_nodelist("gpu[01-02,07],login1") == ["gpu01", "gpu02", "gpu07", "login1"]
    assert expand_slurm_nodelist("node5") == ["node5"]
    with pytest.raises(ValueError, match="SLURM_NODELIST is empty"):
        expand_slurm_nodelist(" ")


@pytest.mark.parametrize("environ, message", [
    (dict(RANK="0", WORLD_SIZE="2"), "RANK, WORLD_SIZE set but LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"),
    (dict(TORCHRUN_NODE1, WORLD_SIZE="12"), "WORLD_SIZE=12 is not a multiple of LOCAL_WORLD_SIZE=8"),
    (dict(TORCHRUN_NODE1, RANK="x"), r"RANK='x' is not an integer"),
    (dict(SRUN_NODE1, SLURM_NTASKS="15"), "15 tasks on 2 nodes"),
    (dict(SRUN_NODE1, SLURM_PROCID="1"), "ranks must be numbered node by node"),  # cyclic distribution
    (dict(SRUN_NODE1, SLURM_LOCALID="8"), "local rank out of range"),
    ({k: v for k, v in SRUN_NODE1.items() if k != "SLURM_JOB_ID"}, "neither MASTER_PORT nor SLURM_JOB_ID"),
    ({k: v for k, v in SRUN_NODE1.items() if k != "SLURM_NODELIST"}, "SLURM_NODELIST is not set"),
])
def test_inconsistent_launcher_variables_are_named(environ, message):
    with pytest.raises(ValueError, match=message):
        detect_launch_environment(environ)


def test_spawning_arguments_conflict_with_a_launcher():
    args = default_argument_parser().parse_args(["--num-gpus", "8"])
    with pytest.raises(SystemExit, match="--num-gpus 8 would start or place processes a second time"):
        launch_main(lambda a: pytest.fail("must not run"), args, environ=TORCHRUN_NODE1)
    # one task (e.g. an sbatch script with one task): Detectron2's launch runs as before
    ran = []
    args = default_argument_parser().parse_args([])
    launch_main(ran.append, args, environ=dict(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0",
                                                SLURM_NODELIST="node5", SLURM_JOB_ID="77"))
    assert ran == [args]


# ------------------------------------------------------------------ submitit, preemption
def test_submit_slurm_parameters_reach_sbatch(monkeypatch, datasets_root, tmp_path):
    """The sbatch script submitit would submit (rendered by submitit itself; no SLURM here)."""
    import submitit
    import submitit.slurm.slurm as submitit_slurm

    monkeypatch.setenv("DETECTRON2_DATASETS", datasets_root)
    monkeypatch.setattr(submitit_slurm.shutil, "which", lambda name: f"/usr/bin/{name}")  # "srun exists"
    tool = load_tool("submit_slurm")
    args = tool.build_parser().parse_args([
        "--config-file", DEMO_CONFIG, "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu",
        "--time", "1-12:00:00", "--mem", "200G", "--account", "vision", "--qos", "high",
        "--slurm-option", "constraint=a100", f"train.output_dir={tmp_path}/run"])
    job_argv, output_dir = tool.job_arguments(args)
    assert output_dir == f"{tmp_path}/run" and job_argv[:2] == ["--config-file", DEMO_CONFIG]
    executor = tool._executor(submitit, args, str(tmp_path / "jobs"))
    sbatch = executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu",
                 "--time=2160", "--mem=200G", "--account=vision", "--qos=high", "--constraint=a100",
                 f"--signal={submitit_slurm.SlurmJobEnvironment.USR_SIG}@120", "--cpus-per-task=8"]:
        assert f"#SBATCH {line}\n" in sbatch, line
    assert tool.parse_time_minutes("90") == 90 and tool.parse_time_minutes("30:30") == 31
    assert tool.parse_time_minutes("24:00:00") == 1440
    with pytest.raises(SystemExit, match="train.init_checkpoint"):
        tool.job_arguments(tool.build_parser().parse_args(["--config-file", DEMO_CONFIG, "--eval-only"]))


def test_submit_slurm_without_submitit_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # "not installed"
    with pytest.raises(SystemExit, match=r"needs submitit .*pip install -e '\.\[cluster\]'"):
        load_tool("submit_slurm")._import_submitit()


def test_requeued_job_resumes_with_resume_flag():
    from dab_detr.engine.submitit_job import TrainingJob

    job = TrainingJob(TRAIN_NET, ["--config-file", "c.py", "train.max_iter=5"])
    requeued = job.checkpoint().function
    assert requeued.argv == ["--resume", "--config-file", "c.py", "train.max_iter=5"]
    assert requeued.checkpoint().function.argv == requeued.argv  # not twice
    evaluation = TrainingJob(TRAIN_NET, ["--config-file", "c.py", "--eval-only"])
    assert evaluation.checkpoint().function.argv == evaluation.argv


def test_submitit_job_preempted_mid_training_checkpoints_requeues_and_finishes(monkeypatch, datasets_root,
                                                                                tmp_path):
    monkeypatch.setenv("DETECTRON2_DATASETS", datasets_root)
    for key in list(os.environ):
        if key in _LAUNCHER_VARS or key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    max_iter = 16
    out = tmp_path / "run"
    tool = load_tool("submit_slurm")
    args = tool.build_parser().parse_args(
        ["--cluster", "local", "--gpus-per-node", "2", "--time", "30", "--config-file", DEMO_CONFIG]
        + SMALL_DEMO + [f"train.output_dir={out}", f"train.max_iter={max_iter}",
                        "train.checkpointer.period=1000"])  # only the preemption saves before the end
    job = tool.submit(args)
    try:
        metrics = out / "metrics.json"
        deadline = time.time() + 600
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):  # iterations 0 and 1 done
            assert not job.done() and time.time() < deadline, "the job ended before training started"
            time.sleep(0.1)
        # SLURM preempts with SIGTERM to every task; submitit's local controller (pid = job id)
        # forwards SIGTERM to its tasks
        os.kill(int(job.job_id), signal.SIGTERM)
        job.wait()
        assert job.state == "FINISHED"
        job.results()  # raises if a task failed
    finally:
        if not job.done():
            job.cancel()

    log = job.task(0).stdout()  # the main process's log (stderr goes to the same file)
    match = re.search(r"Received SIGTERM: saving a checkpoint after iteration (\d+) and stopping", log)
    assert match, log[-5000:]
    saved = int(match.group(1))
    assert 1 <= saved < max_iter - 1
    assert "this job is preempted" in log and "Requeued job" in log
    starts = [int(i) for i in re.findall(r"Starting training from iteration (\d+)", log)]
    assert starts == [0, saved + 1]  # the requeued run started right after the saved iteration
    checkpoint = out / f"model_{saved:07d}.pth"
    assert f"Loading trainer from {checkpoint}" in log  # model, optimizer, scheduler, iteration
    assert _load(checkpoint)["iteration"] == saved
    assert _load(out / "model_final.pth")["iteration"] == max_iter - 1
    with open(metrics) as f:  # every iteration ran exactly once over the two runs
        assert [json.loads(line)["iteration"] for line in f] == list(range(max_iter))
    assert "--resume" in job.submission().function.argv  # what the requeued job ran


# ------------------------------------------------------------------ the preemption hook, in-process
class _SignalAt(HookBase):
    """Sends ``signum`` to this process while iteration ``at`` runs (as SLURM would, any time)."""

    def __init__(self, at, signum):
        self.at, self.signum = at, signum

    def before_step(self):
        if self.trainer.iter == self.at:
            os.kill(os.getpid(), self.signum)


def _tiny_config(tmp_path):
    config_path, _, _ = write_user_config(tmp_path)  # the tiny user config of test_custom_data
    return LazyConfig.apply_overrides(LazyConfig.load(config_path), ["train.checkpointer.period=100"])


def test_signal_stops_training_after_the_step_with_a_resumable_checkpoint(tmp_path):
    previous = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler([signal.SIGUSR1, signal.SIGTERM]) as handler:
        assert active_preemption_handler() is handler
        cfg = _tiny_config(tmp_path)  # 4 iterations
        trainer = LazyConfigTrainer(cfg)
        assert any(isinstance(h, PreemptionCheckpointHook) for h in trainer._hooks)
        trainer.resume_or_load(resume=False)
        trainer.register_hooks([_SignalAt(1, signal.SIGUSR1)])
        with pytest.raises(TrainingPreempted, match="SIGUSR1 after iteration 1") as stopped:
            trainer.train()
    assert signal.getsignal(signal.SIGUSR1) == previous and active_preemption_handler() is None
    out = cfg.train.output_dir
    assert stopped.value.checkpoint == os.path.join(out, "model_0000001.pth")
    saved = _load(stopped.value.checkpoint)
    assert saved["iteration"] == 1
    assert saved["trainer"]["_trainer"]["optimizer"]["state"]  # optimizer state for --resume
    assert not os.path.exists(os.path.join(out, "model_final.pth"))
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_0000001.pth"

    assert preemption_hooks(trainer.checkpointer) == []  # plain runs (no handler): no hook

    # the requeued run: --resume continues at iteration 2; a signal during the last iteration
    # does not interrupt it (the final checkpoint is the one to keep)
    with PreemptionHandler([signal.SIGTERM]):
        resumed = LazyConfigTrainer(cfg)
        resumed.resume_or_load(resume=True)
        assert resumed.start_iter == 2
        for key, value in saved["model"].items():
            torch.testing.assert_close(resumed.model.state_dict()[key], value, atol=0, rtol=0)
        resumed.register_hooks([_SignalAt(3, signal.SIGTERM)])
        resumed.train()
    assert _load(os.path.join(out, "model_final.pth"))["iteration"] == 3
    with pytest.raises(RuntimeError, match="already installed"):
        with PreemptionHandler():
            PreemptionHandler().install()


def test_init_distributed_sets_up_detectron2s_process_groups(tmp_path):
    """One process: the same calls as Detectron2's _distributed_worker, so comm works."""
    env = LaunchEnvironment("torchrun", rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
                            num_nodes=1, master_addr="127.0.0.1", master_port=_free_port())
    try:
        init_distributed(env)
        assert torch.distributed.get_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
        assert (comm.get_rank(), comm.get_world_size(), comm.get_local_rank(), comm.get_local_size()) == (0, 1, 0, 1)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        comm._LOCAL_PROCESS_GROUP = None  # Detectron2 has no public reset
