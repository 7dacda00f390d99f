"""A missing file named on the training tool's command line (config, train.init_checkpoint) is one
line naming it and exit 1, no traceback (run as a user runs it: a subprocess of the tool)."""
import os
import subprocess
import sys

import pytest
from conftest import REPO

DEMO_CONFIG = "configs/dab_detr_demo.py"


def _run_train_net(*args):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "lazyconfig_train_net.py"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nowhere.py"
    last = _run_train_net("--config-file", str(missing))
    assert f"config file {missing} does not exist" in last


@pytest.mark.parametrize("mode", ["eval-only", "train"])
def test_missing_init_checkpoint(tmp_path, mode):
    missing = tmp_path / "nowhere.pth"
    args = ["--config-file", DEMO_CONFIG, f"train.init_checkpoint={missing}", f"train.output_dir={tmp_path / 'out'}"]
    last = _run_train_net(*(["--eval-only"] if mode == "eval-only" else []), *args)
    assert last == f"error: checkpoint {missing} does not exist"
