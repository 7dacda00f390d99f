"""Kill and resume with real processes (issue 14), on the demo config (``configs/dab_detr_demo.py``,
same model, loader and schedule shape) with a 32-image copy of the demo data and 30 iterations.

- ``test_sigkill_inside_a_checkpoint_write_then_resume_is_the_same_run``: the training process is
  SIGKILLed while it writes ``model_0000019.pth`` (the test hook of ``atomic_write`` holds the write
  open between data and rename; the test waits for the temporary file, so the kill lands inside
  the write every time). The folder then still points at the complete ``model_0000009.pth``;
  ``--resume`` removes the partial write, continues from iteration 10 and ends with exactly the
  weights (BatchNorm statistics included) of an uninterrupted run: same data order, same
  augmentations, same random state. CPU, one thread in every run.
"""
import glob
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import REPO
from dab_detr.checkpoint.atomic_write import TEST_PAUSE_ENV
from dab_detr.data import demo_dataset

WRAPPER = '''\
"""configs/dab_detr_demo.py on a 32-image copy of the demo data (for tests)."""
from detectron2.config import LazyConfig
from dab_detr.data import demo_dataset as _demo_dataset

_demo_dataset._SPLITS = {splits!r}
_names = _demo_dataset.register_demo_dataset({root!r}, prefix="dab_demo_small")
model, dataloader, optimizer, train, lr_multiplier = LazyConfig.load(
    {demo!r}, ("model", "dataloader", "optimizer", "train", "lr_multiplier"))
dataloader.train.dataset.names = _names[0]
dataloader.test.dataset.names = _names[1]
'''
SPLITS = {"train": (32, 1), "val": (4, 2)}
MAX_ITER = 30


def _write_config(tmp_path, monkeypatch):
    root = str(tmp_path / "dab_demo_small")
    monkeypatch.setattr(demo_dataset, "_SPLITS", SPLITS)
    demo_dataset.ensure_demo_dataset(root)  # once, before the processes start
    path = tmp_path / "demo_small.py"
    path.write_text(WRAPPER.format(splits=SPLITS, root=root, demo=os.path.join(REPO, "configs", "dab_detr_demo.py")))
    return str(path)


def _command(config_path, output_dir, *extra):
    return [sys.executable, os.path.join(REPO, "tools", "lazyconfig_train_net.py"), "--config-file", config_path,
            *extra, f"train.output_dir={output_dir}", f"train.max_iter={MAX_ITER}", "train.device=cpu",
            "train.checkpointer.period=10", "train.checkpointer.max_to_keep=10", "train.log_period=10",
            "dataloader.train.total_batch_size=2"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    env.pop(TEST_PAUSE_ENV, None)
    env.update(extra)
    return env


def _run(cmd, **env):
    result = subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _last_checkpoint(folder):
    with open(os.path.join(folder, "last_checkpoint")) as f:
        return f.read().strip()


def _assert_same_weights(actual, expected, what):
    assert actual.keys() == expected.keys()
    differences = {key: (actual[key].double() - value.double()).abs().max().item()
                   for key, value in expected.items() if value.numel()}
    worst = max(differences, key=differences.get)
    assert differences[worst] == 0, (f"{what}: {sum(d > 0 for d in differences.values())} tensors differ, "
                                     f"the most {worst} by {differences[worst]:.3g}")


def test_sigkill_inside_a_checkpoint_write_then_resume_is_the_same_run(tmp_path, monkeypatch):
    config_path = _write_config(tmp_path, monkeypatch)

    reference_dir = str(tmp_path / "uninterrupted")
    _run(_command(config_path, reference_dir))
    reference = _load(os.path.join(reference_dir, "model_final.pth"))
    assert reference["iteration"] == MAX_ITER - 1

    out = str(tmp_path / "killed")
    process = subprocess.Popen(_command(config_path, out), cwd=REPO, start_new_session=True,
                               env=_env(**{TEST_PAUSE_ENV: "model_0000019.pth:600"}),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 500
        partial = []
        while not partial and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
            partial = glob.glob(os.path.join(out, ".model_0000019.pth.tmp-*"))
        assert partial, f"the write of model_0000019.pth never started: {process.stderr.read()[-3000:]}"
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the trainer and its data-loader worker
        process.wait()
    assert process.returncode == -signal.SIGKILL
    # killed inside the write: the partial file is there, the checkpoint is not, the folder points
    # at the previous complete one
    assert os.path.isfile(partial[0]) and not os.path.exists(os.path.join(out, "model_0000019.pth"))
    assert _last_checkpoint(out) == "model_0000009.pth"
    assert _load(os.path.join(out, "model_0000009.pth"))["iteration"] == 9

    resumed = _run(_command(config_path, out, "--resume"))
    log = resumed.stdout + resumed.stderr
    assert "removed 1 incomplete checkpoint writes" in log and "Starting training from iteration 10" in log
    assert not glob.glob(os.path.join(out, ".*.tmp-*"))
    final = _load(os.path.join(out, "model_final.pth"))
    assert final["iteration"] == MAX_ITER - 1 and _last_checkpoint(out) == "model_final.pth"
    _assert_same_weights(final["model"], reference["model"], "final weights")
    _assert_same_weights(_load(os.path.join(out, "model_0000019.pth"))["model"],
                         _load(os.path.join(reference_dir, "model_0000019.pth"))["model"], "iteration 19")
    assert final["train_loader"] == reference["train_loader"] == {"batches_consumed": MAX_ITER,
                                                                  "seed": reference["train_loader"]["seed"]}
    # the test has teeth: training moved the weights well beyond any rounding
    early = _load(os.path.join(out, "model_0000009.pth"))["model"]
    moved = max((final["model"][k] - early[k]).abs().max().item() for k in early if early[k].is_floating_point())
    assert moved > 1e-3
