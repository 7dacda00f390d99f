"""LazyConfigTrainer end to end on a tiny registered COCO-format dataset: checkpoints, kill and
resume (iteration, model, optimizer, lr schedule, EMA), ``--eval-only`` through the launcher, and
2 CPU processes (gloo) against 1 process at the same total batch."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import HookBase
from detectron2.engine.defaults import default_argument_parser

from conftest import REPO, load_tool
from dab_detr.checkpoint import DABDETRCheckpointer
from dab_detr.engine import LazyConfigTrainer
from test_custom_data import write_user_config


class _Killed(Exception):
    pass


class _KillAt(HookBase):
    """Simulates the job being killed just before iteration ``at`` runs."""

    def __init__(self, at):
        self.at = at

    def before_step(self):
        if self.trainer.iter == self.at:
            raise _Killed(f"killed before iteration {self.at}")


class _RecordLR(HookBase):
    def __init__(self):
        self.lrs = {}

    def before_step(self):
        # the transformer's lr (the backbone's groups have 0.1x)
        self.lrs[self.trainer.iter] = max(g["lr"] for g in self.trainer.optimizer.param_groups)


def _config(tmp_path, **overrides):
    config_path, _, _ = write_user_config(tmp_path)
    cfg = LazyConfig.load(config_path)
    for key, value in overrides.items():
        cfg = LazyConfig.apply_overrides(cfg, [f"{key}={value}"])
    return cfg, config_path


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_tensors_equal(actual, expected, what):
    assert actual.keys() == expected.keys(), what
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=0, rtol=0, msg=f"{what}: {key}")


def test_train_checkpoint_kill_and_resume(tmp_path):
    # 6 iterations, checkpoints after iterations 1 and 3 (period 2), lr x0.1 from iteration 2
    cfg, _ = _config(tmp_path, **{"train.max_iter": 6, "train.model_ema.enabled": True,
                                  "train.model_ema.decay": 0.9, "train.model_ema.warmup": 2})
    out = cfg.train.output_dir
    base_lr = cfg.optimizer.lr

    trainer = LazyConfigTrainer(cfg)
    trainer.resume_or_load(resume=False)
    assert trainer.start_iter == 0
    recorder = _RecordLR()
    trainer.register_hooks([_KillAt(4), recorder])
    with pytest.raises(_Killed):
        trainer.train()
    assert recorder.lrs == pytest.approx({0: base_lr, 1: base_lr, 2: base_lr * 0.1, 3: base_lr * 0.1})
    assert sorted(p for p in os.listdir(out) if p.endswith(".pth")) == ["model_0000001.pth", "model_0000003.pth"]
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_0000003.pth"
    saved = _load(os.path.join(out, "model_0000003.pth"))
    assert saved["iteration"] == 3
    assert saved["model_ema"]["updates"] == 4  # one EMA update per finished step
    assert trainer.optimizer.state_dict()["state"]  # trained

    # a new process would build everything again: a new trainer from the same config
    torch.manual_seed(123)  # other initial weights, so restoring them is visible
    resumed = LazyConfigTrainer(cfg)
    fresh_weight = resumed.model.class_embed.weight.detach().clone()
    assert not torch.equal(fresh_weight, saved["model"]["class_embed.weight"])
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == saved["iteration"] + 1 == 4

    _assert_tensors_equal(resumed.model.state_dict(), saved["model"], "model")
    saved_optim = saved["trainer"]["_trainer"]["optimizer"]  # DefaultTrainer's checkpoint layout
    optim_state = resumed.optimizer.state_dict()
    assert len(optim_state["state"]) == len(saved_optim["state"]) > 0
    for index, state in saved_optim["state"].items():
        _assert_tensors_equal(optim_state["state"][index], state, f"optimizer state {index}")
        assert state["step"].item() == 4
    assert [g["lr"] for g in optim_state["param_groups"]] == [g["lr"] for g in saved_optim["param_groups"]]
    assert max(g["lr"] for g in saved_optim["param_groups"]) == pytest.approx(base_lr * 0.1)
    assert "grad_scaler" in saved["trainer"]["_trainer"]
    assert resumed.ema.updates == 4
    _assert_tensors_equal(resumed.ema.shadow, saved["model_ema"]["shadow"], "EMA")

    # the resumed run continues the schedule (lr x0.1) for iterations 4 and 5 only
    recorder = _RecordLR()
    resumed.register_hooks([recorder])
    resumed.train()
    assert recorder.lrs == pytest.approx({4: base_lr * 0.1, 5: base_lr * 0.1})
    final = _load(os.path.join(out, "model_final.pth"))
    assert final["iteration"] == 5 and final["model_ema"]["updates"] == 6
    assert not torch.equal(final["model"]["class_embed.weight"], saved["model"]["class_embed.weight"])


def _launcher_args(config_path, *opts, eval_only=False, num_gpus=1, dist_url="auto"):
    argv = ["--config-file", config_path, "--num-gpus", str(num_gpus), "--dist-url", dist_url]
    if eval_only:
        argv.append("--eval-only")
    return default_argument_parser().parse_args(argv + list(opts))


def test_eval_only_through_launcher_reproduces_direct_evaluation(tmp_path):
    cfg, config_path = _config(tmp_path, **{"train.max_iter": 2, "lr_multiplier.milestones": "[1]"})
    trainer = LazyConfigTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    checkpoint = os.path.join(cfg.train.output_dir, "model_final.pth")

    # direct: the same weights in a fresh model, evaluated with LazyConfigTrainer.test
    direct_dir = str(tmp_path / "direct")
    cfg.train.output_dir = direct_dir
    model = instantiate(cfg.model)
    DABDETRCheckpointer(model).load(checkpoint)
    direct = LazyConfigTrainer.test(cfg, model.eval())

    tool = load_tool("lazyconfig_train_net")
    launched_dir = str(tmp_path / "launched")
    launched = tool.main(_launcher_args(config_path, f"train.init_checkpoint={checkpoint}",
                                        f"train.output_dir={launched_dir}", eval_only=True))
    assert set(direct["bbox"]) == set(launched["bbox"])
    for key, value in direct["bbox"].items():
        assert value == pytest.approx(launched["bbox"][key], nan_ok=True, abs=1e-9), key
    # and detection by detection
    with open(os.path.join(direct_dir, "coco_instances_results.json")) as f:
        direct_dets = json.load(f)
    with open(os.path.join(launched_dir, "coco_instances_results.json")) as f:
        launched_dets = json.load(f)
    assert len(direct_dets) == len(launched_dets) > 0
    for a, b in zip(direct_dets, launched_dets):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-4) and a["score"] == pytest.approx(b["score"], abs=1e-6)

    with pytest.raises(SystemExit, match="train.init_checkpoint"):
        tool.main(_launcher_args(config_path, f"train.output_dir={launched_dir}", eval_only=True))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config_path, output_dir, num_gpus, max_iter):
    cmd = [sys.executable, os.path.join(REPO, "tools", "lazyconfig_train_net.py"),
           "--config-file", config_path, "--num-gpus", str(num_gpus),
           "--dist-url", f"tcp://127.0.0.1:{_free_port()}",
           f"train.output_dir={output_dir}", f"train.max_iter={max_iter}",
           "train.checkpointer.period=1", "train.clip_grad.enabled=False",
           "lr_multiplier.milestones=[1]"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return _load(os.path.join(output_dir, "model_0000000.pth")), _load(os.path.join(output_dir, "model_final.pth"))


SGD_CONFIG = '''\
# the user config with plain SGD: its update is proportional to the gradient, so a wrong gradient
# scale across processes (sum instead of mean, wrong box normalizer) shows in the weights
import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate

model, dataloader, optimizer, train, lr_multiplier = LazyConfig.load(
    {user_config!r}, ("model", "dataloader", "optimizer", "train", "lr_multiplier"))
optimizer = L(torch.optim.SGD)(params=optimizer.params, lr=0.05, momentum=0.0, weight_decay=0.0)
'''


def test_two_cpu_processes_match_one_process_at_the_same_total_batch(tmp_path):
    """The data order is made identical: the config's TrainingSampler has shuffle=False, so with
    total batch 2 the single process gets images (0, 1), (2, 3), ... and with 2 processes rank 0
    gets 0, 2, ... and rank 1 gets 1, 3, ... - the same images in every step. The images have
    different numbers of boxes (1, 2, 3, 1), so the box normalizer averaged over processes matters."""
    user_config, _, _ = write_user_config(tmp_path)
    config_path = str(tmp_path / "sgd_config.py")
    with open(config_path, "w") as f:
        f.write(SGD_CONFIG.format(user_config=user_config))
    one_first, one = _launch(config_path, str(tmp_path / "one"), num_gpus=1, max_iter=2)
    two_first, two = _launch(config_path, str(tmp_path / "two"), num_gpus=2, max_iter=2)
    assert one["iteration"] == two["iteration"] == 1
    for a, b in ((one_first, two_first), (one, two)):
        for key, value in a["model"].items():
            torch.testing.assert_close(b["model"][key], value, atol=1e-5, rtol=1e-4, msg=key)
    # the second step moved the weights by far more than the tolerance (the test has teeth)
    moved = max((one["model"][k] - one_first["model"][k]).abs().max().item() for k in one["model"]
                if one["model"][k].dtype.is_floating_point)
    assert moved > 1e-3


def test_eval_only_uses_the_ema_weights_of_a_checkpoint(tmp_path):
    cfg, config_path = _config(tmp_path, **{"train.max_iter": 2, "lr_multiplier.milestones": "[1]",
                                            "train.model_ema.enabled": True, "train.model_ema.decay": 0.5,
                                            "train.model_ema.warmup": 0})
    trainer = LazyConfigTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    checkpoint = os.path.join(cfg.train.output_dir, "model_final.pth")
    saved = _load(checkpoint)

    def scores(output_dir):
        with open(os.path.join(output_dir, "coco_instances_results.json")) as f:
            return [d["score"] for d in json.load(f)]

    # reference: a model holding the EMA shadow weights, and one holding the raw weights
    for name, weights in (("ema", saved["model_ema"]["shadow"]), ("raw", saved["model"])):
        model = instantiate(cfg.model)
        model.load_state_dict(weights, strict=False)
        cfg.train.output_dir = str(tmp_path / name)
        LazyConfigTrainer.test(cfg, model.eval())

    tool = load_tool("lazyconfig_train_net")
    launched_dir = str(tmp_path / "launched")
    tool.main(_launcher_args(config_path, f"train.init_checkpoint={checkpoint}", f"train.output_dir={launched_dir}",
                             "train.model_ema.enabled=True", eval_only=True))
    launched = scores(launched_dir)
    assert launched == pytest.approx(scores(str(tmp_path / "ema")), abs=1e-6)
    assert launched != pytest.approx(scores(str(tmp_path / "raw")), abs=1e-6)
