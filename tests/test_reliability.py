"""Reliability (issue 14): unknown config keys and arguments, a diverging step, and a resume from
a damaged checkpoint folder. The kill-and-resume tests with a real process are in
``test_reliability_resume.py``."""
import logging
import os

import pytest
import torch

from detectron2.config import LazyConfig
from detectron2.engine import HookBase
from detectron2.engine.defaults import default_argument_parser

from conftest import load_tool
from dab_detr.checkpoint import CheckpointError
from dab_detr.config_checks import ConfigError, apply_checked_overrides, check_config
from dab_detr.engine import LazyConfigTrainer
from dab_detr.engine.divergence import TrainingDivergedError
from test_custom_data import write_user_config


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _pth_files(folder):
    return sorted(p for p in os.listdir(folder) if p.endswith(".pth"))


def _last_checkpoint(folder):
    with open(os.path.join(folder, "last_checkpoint")) as f:
        return f.read().strip()


# ------------------------------------------------------------------ config keys and arguments
def _tool_main(config_path, *opts):
    args = default_argument_parser().parse_args(["--config-file", config_path, *opts])
    return load_tool("lazyconfig_train_net").main(args)


def test_unknown_override_key_stops_naming_it_and_the_nearest_keys(tmp_path):
    config_path, _, _ = write_user_config(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        _tool_main(config_path, "train.max_iterr=2")
    message = str(exit_info.value.code)
    assert "'train.max_iterr'" in message and "no key 'max_iterr' under 'train'" in message
    assert "did you mean 'train.max_iter'" in message
    assert not os.path.exists(tmp_path / "output" / "model_final.pth")  # nothing ran


def test_unknown_model_argument_names_the_class_and_its_arguments(tmp_path):
    config_path, _, _ = write_user_config(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        _tool_main(config_path, "model.num_clases=3")
    message = str(exit_info.value.code)
    assert "model.num_clases: DABDETR has no argument 'num_clases'; did you mean 'num_classes'?" in message
    assert "accepted arguments: backbone, in_feature, position_embedding, transformer" in message

    # the same typo written in a config file, and a typo in a nested part
    cfg = LazyConfig.load(config_path)
    cfg.model.num_clases = 3
    cfg.model.transformer.num_decoder_layer = 2
    with pytest.raises(ConfigError) as error:
        LazyConfigTrainer(cfg)  # checked before anything is built
    message = str(error.value)
    assert "model.num_clases: DABDETR has no argument" in message
    assert "model.transformer.num_decoder_layer: DABTransformer has no argument 'num_decoder_layer'; " \
           "did you mean 'num_decoder_layers' or 'num_encoder_layers'?" in message


def test_typo_of_a_train_setting_in_a_config_file_is_an_error(tmp_path):
    config_path, _, _ = write_user_config(tmp_path)
    cfg = LazyConfig.load(config_path)
    cfg.train.max_iterr = 5
    with pytest.raises(ConfigError, match=r"train.max_iterr is not a setting of the trainer; did you mean 'max_iter'"):
        check_config(cfg)


def test_existing_keys_and_new_arguments_of_a_target_are_accepted(tmp_path):
    config_path, _, _ = write_user_config(tmp_path)
    cfg = LazyConfig.load(config_path)
    cfg = apply_checked_overrides(cfg, ["train.max_iter=7", "model.num_queries=5",
                                        "dataloader.train.aspect_ratio_grouping=False"])
    assert cfg.train.max_iter == 7 and cfg.model.num_queries == 5
    assert cfg.dataloader.train.aspect_ratio_grouping is False
    check_config(cfg)
    with pytest.raises(ConfigError, match=r"DetrDatasetMapper has no argument 'image_fromat'; did you mean 'image_format'"):
        apply_checked_overrides(cfg, ["dataloader.train.mapper.image_fromat=BGR"])


# ------------------------------------------------------------------ atomic writes
def test_atomic_write_replaces_only_a_complete_file(tmp_path):
    from dab_detr.checkpoint.atomic_write import atomic_write, remove_stale_temporary_files
    path = str(tmp_path / "model.pth")
    with atomic_write(path) as f:
        f.write(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write(b"new, but the writer fails half-way")
            raise RuntimeError("disk full")
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["model.pth"]
    with atomic_write(path, "w") as f:
        f.write("new")
    assert open(path).read() == "new" and os.listdir(tmp_path) == ["model.pth"]
    stale = tmp_path / ".model.pth.tmp-abc123"  # what a killed writer leaves
    stale.write_bytes(b"partial")
    assert remove_stale_temporary_files(str(tmp_path)) == [str(stale)]
    assert os.listdir(tmp_path) == ["model.pth"]


# ------------------------------------------------------------------ divergence
class _PoisonGradient(HookBase):
    """From iteration ``at`` on, the gradient of class_embed.weight is NaN (the loss stays finite)."""

    def __init__(self, at):
        self.at, self.weights_before = at, None

    def before_train(self):
        self.trainer.model.class_embed.weight.register_hook(
            lambda g: g * float("nan") if self.trainer.iter >= self.at else g)

    def before_step(self):
        if self.trainer.iter == self.at:
            self.weights_before = {k: v.clone() for k, v in self.trainer.model.state_dict().items()}


def _user_config(tmp_path, **overrides):
    config_path, _, _ = write_user_config(tmp_path)
    cfg = LazyConfig.load(config_path)
    return apply_checked_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])


def test_non_finite_gradient_stops_before_the_step_and_writes_no_checkpoint(tmp_path):
    # checkpoints after iterations 1 and 3 (period 2): the gradient goes bad in iteration 3
    cfg = _user_config(tmp_path, **{"train.max_iter": 6})
    out = cfg.train.output_dir
    trainer = LazyConfigTrainer(cfg)
    trainer.resume_or_load(resume=False)
    poison = _PoisonGradient(at=3)
    trainer.register_hooks([poison])
    with pytest.raises(TrainingDivergedError) as error:
        trainer.train()
    message = str(error.value)
    assert message.startswith("training diverged at iteration 3: the gradient is not finite")
    assert "loss_class=" in message and "loss_bbox=" in message and "loss_giou_0=" in message
    assert "non-finite gradients in 1 parameters: class_embed.weight" in message
    # the step was not applied, and the checkpoint of iteration 3 was not written
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, poison.weights_before[key], atol=0, rtol=0, msg=key)
    assert _pth_files(out) == ["model_0000001.pth"] and _last_checkpoint(out) == "model_0000001.pth"

    # --resume continues from the last good checkpoint
    resumed = LazyConfigTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2


def test_non_finite_loss_stops_naming_the_iteration_and_the_loss_terms(tmp_path):
    cfg = _user_config(tmp_path, **{"train.max_iter": 3})
    trainer = LazyConfigTrainer(cfg)
    trainer.resume_or_load(resume=False)

    def poison_loss(module, inputs, losses):
        if trainer.iter == 2:
            return dict(losses, loss_giou=losses["loss_giou"] * float("inf"))
        return None

    trainer.model.register_forward_hook(poison_loss)
    with pytest.raises(TrainingDivergedError) as error:
        trainer.train()
    message = str(error.value)
    assert message.startswith("training diverged at iteration 2: the loss is not finite")
    assert "loss_giou=inf" in message and "(total inf)" in message
    assert "model_final.pth" not in _pth_files(cfg.train.output_dir)
    # step 2 started from the checkpoint of iteration 1: it is not trusted (issue 25)
    assert "renamed (not deleted): model_0000001.pth.suspect" in message
    assert "--resume starts the run again from train.init_checkpoint" in message
    assert _pth_files(cfg.train.output_dir) == []
    assert not os.path.exists(os.path.join(cfg.train.output_dir, "last_checkpoint"))


# ------------------------------------------------------------------ resume from a damaged folder
def test_resume_skips_a_truncated_checkpoint_and_finishes_the_run(tmp_path, caplog):
    # checkpoints after iterations 1 and 3, and model_final after iteration 4
    cfg = _user_config(tmp_path, **{"train.max_iter": 5})
    out = cfg.train.output_dir
    trainer = LazyConfigTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    final_path = os.path.join(out, "model_final.pth")
    uninterrupted = _load(final_path)
    assert uninterrupted["iteration"] == 4 and _last_checkpoint(out) == "model_final.pth"

    data = open(final_path, "rb").read()
    with open(final_path, "wb") as f:  # a copy that stopped half-way (not written by us)
        f.write(data[: len(data) // 2])
    caplog.set_level(logging.WARNING, logger="dab_detr")
    resumed = LazyConfigTrainer(cfg)
    resumed.resume_or_load(resume=True)
    text = caplog.text
    assert "model_final.pth cannot be read" in text and "resuming from" in text and "model_0000003.pth" in text
    assert resumed.start_iter == 4 and _last_checkpoint(out) == "model_0000003.pth"
    resumed.train()
    final = _load(final_path)
    assert final["iteration"] == 4 and _last_checkpoint(out) == "model_final.pth"
    # and it is the same run: equal weights to the uninterrupted one
    for key, value in uninterrupted["model"].items():
        torch.testing.assert_close(final["model"][key], value, atol=0, rtol=0, msg=key)

    # nothing readable left: an error naming every file, not a silent fresh start
    for name in _pth_files(out):
        with open(os.path.join(out, name), "wb") as f:
            f.write(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError) as error:
        LazyConfigTrainer(cfg).resume_or_load(resume=True)
    message = str(error.value)
    assert "no readable training checkpoint" in message
    assert all(name in message for name in ("model_final.pth", "model_0000001.pth", "model_0000003.pth"))


# ------------------------------------------------------------------ the resumable train loader
from dab_detr.data.resumable_loader import ResumableBatchSampler, build_resumable_train_loader  # noqa: E402


def _records(n=10):
    # landscape, portrait and square images: two aspect-ratio buckets
    sizes = [(64, 48), (48, 64), (64, 64), (80, 40), (40, 80)]
    return [{"file_name": f"{i}.png", "image_id": i, "width": sizes[i % 5][0], "height": sizes[i % 5][1]}
            for i in range(n)]


def _random_mapper(record):
    """Stands for the augmentation: draws from numpy's and Python's global RNGs."""
    import random
    import numpy as np
    return {"image_id": record["image_id"], "draw": float(np.random.rand()), "py": random.random(),
            "landscape": record["width"] > record["height"]}


def _take(iterable, n):
    out = []
    for batch in iterable:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_batch_sampler_started_at_k_continues_the_full_stream():
    for rank in (0, 1):
        groups = [0 if r["width"] > r["height"] else 1 for r in _records()]
        full = ResumableBatchSampler(10, 3, shuffle=True, seed=5, aspect_groups=groups, rank=rank, world_size=2)
        batches = _take(full, 12)  # more than one epoch: the permutation changes per epoch
        assert all(len({groups[i] for i, _ in b}) == 1 for b in batches)  # one bucket per batch
        positions = [p for b in batches for _, p in b]
        assert all(p % 2 == rank for p in positions)  # this rank's share of the global stream
        resumed = ResumableBatchSampler(10, 3, shuffle=True, seed=5, aspect_groups=groups, rank=rank, world_size=2)
        resumed.start_batch = 7
        assert _take(resumed, 5) == batches[7:]


def test_loader_is_the_same_with_workers_and_after_a_restart_and_leaves_global_rngs_alone():
    import random
    import numpy as np
    records = _records()
    np.random.seed(123)
    random.seed(123)
    before = (np.random.rand(), random.random())
    np.random.seed(123)
    random.seed(123)
    loader = build_resumable_train_loader(records, mapper=_random_mapper, total_batch_size=2, seed=3)
    full = _take(loader, 8)
    assert (np.random.rand(), random.random()) == before  # the main process's RNGs untouched
    assert loader.state_dict() == {"batches_consumed": 8, "seed": 3}
    assert all(len({x["landscape"] for x in batch}) == 1 for batch in full)
    assert len({x["draw"] for batch in full for x in batch}) == 16  # a fresh draw for every sample

    with_workers = build_resumable_train_loader(records, mapper=_random_mapper, total_batch_size=2, seed=3,
                                                num_workers=2)
    assert _take(with_workers, 8) == full

    restarted = build_resumable_train_loader(records, mapper=_random_mapper, total_batch_size=2, seed=0)
    restarted.load_state_dict({"batches_consumed": 5, "seed": 3})
    assert _take(restarted, 3) == full[5:]
    with pytest.raises(RuntimeError, match="before iterating"):
        restarted.load_state_dict({"batches_consumed": 1, "seed": 3})
