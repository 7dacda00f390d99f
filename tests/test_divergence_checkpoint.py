"""Issue 25 item 2: a checkpoint is trusted only once a finite step has followed it.

The checkpoint of iteration k holds the weights after step k; step k+1 starts from them. When
step k+1 is not finite, the checkpoint of k (written by the periodic checkpointer before anyone
could know) is renamed to ``.suspect`` and ``last_checkpoint`` points at the newest checkpoint
that was followed by a finite step, so that ``--resume`` does not loop on the diverged weights.
"""
import os

import pytest
import torch

from dab_detr.engine import LazyConfigTrainer
from dab_detr.engine.divergence import TrainingDivergedError
from test_reliability import _last_checkpoint, _load, _pth_files, _user_config

BLOW_UP_FROM = 15  # the weights of step 14 (checkpointed, period 5) give a non-finite loss


def _trainer(cfg, resume):
    trainer = LazyConfigTrainer(cfg)
    trainer.resume_or_load(resume=resume)

    def blown_up_weights(module, inputs, losses):
        # stands for the weights a 1e10 learning rate at step 14 leaves: every later loss is inf
        if trainer.iter >= BLOW_UP_FROM:
            return dict(losses, loss_bbox=losses["loss_bbox"] * float("inf"))
        return None

    trainer.model.register_forward_hook(blown_up_weights)
    return trainer


def _train_until_divergence(trainer):
    with pytest.raises(TrainingDivergedError) as error:
        trainer.train()
    return str(error.value)


def test_checkpoint_before_a_diverged_step_is_not_resumed_from(tmp_path):
    cfg = _user_config(tmp_path, **{"train.max_iter": 20, "train.checkpointer.period": 5,
                                    "train.checkpointer.max_to_keep": 10})
    out = cfg.train.output_dir
    message = _train_until_divergence(_trainer(cfg, resume=False))
    good = os.path.join(out, "model_0000009.pth")
    assert message.startswith("training diverged at iteration 15: the loss is not finite")
    assert "renamed (not deleted): model_0000014.pth.suspect" in message
    assert f"--resume continues from {good}" in message
    assert _last_checkpoint(out) == "model_0000009.pth"
    assert _pth_files(out) == ["model_0000004.pth", "model_0000009.pth"]
    assert os.path.isfile(os.path.join(out, "model_0000014.pth.suspect"))

    # --resume: from the good weights, at iteration 10; the same lr diverges again, same message
    good_weights = _load(good)["model"]
    resumed = _trainer(cfg, resume=True)
    assert resumed.start_iter == 10
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, good_weights[key], atol=0, rtol=0, msg=key)
    assert _train_until_divergence(resumed) == message
    assert _last_checkpoint(out) == "model_0000009.pth"


def test_no_checkpoint_followed_by_a_finite_step_removes_last_checkpoint(tmp_path):
    # no checkpoint was followed by a finite step: last_checkpoint goes, --resume starts again
    cfg = _user_config(tmp_path, **{"train.max_iter": 20, "train.checkpointer.period": 15,
                                    "train.checkpointer.max_to_keep": 10})
    out = cfg.train.output_dir
    message = _train_until_divergence(_trainer(cfg, resume=False))
    assert "renamed (not deleted): model_0000014.pth.suspect" in message
    assert "--resume starts the run again from train.init_checkpoint" in message
    assert not os.path.exists(os.path.join(out, "last_checkpoint")) and _pth_files(out) == []
    assert _trainer(cfg, resume=True).start_iter == 0
