"""A missing or unreadable file named on a tool's command line (config, checkpoint, image, metrics
file, output) is one line naming it and exit status 1, never a traceback; every tool of tools/.

The tools run in this process as ``python tools/X.py ARGS`` runs them (``runpy`` with
``__name__ == "__main__"`` and ``sys.argv`` set): ``SystemExit`` with a message is what the
interpreter prints on stderr before exiting with status 1. Two runs are real subprocesses, to show
exactly that for the training tool and for the conversion tool.
"""
import os
import runpy
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from detectron2.config import LazyConfig, instantiate

from dab_detr.user_errors import file_problem, output_problem

DEMO_CONFIG = "configs/dab_detr_demo.py"


def run_tool(monkeypatch, tool, *args):
    """The one-line message with which ``tools/<tool>.py ARGS`` ends with exit status 1."""
    path = os.path.join(REPO, "tools", f"{tool}.py")
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [path, *map(str, args)])
    with pytest.raises(SystemExit) as stop:  # any other exception would be a traceback
        runpy.run_path(path, run_name="__main__")
    message = stop.value.code
    assert isinstance(message, str), f"{tool} exited with {message!r}, not with a message (exit status 1)"
    assert "\n" not in message.strip() and "Traceback" not in message, message
    return message


def run_subprocess(tool, *args):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", f"{tool}.py"), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """A checkpoint that fits the demo config (random weights)."""
    torch.manual_seed(0)
    model = instantiate(LazyConfig.load(os.path.join(REPO, DEMO_CONFIG)).model)
    path = tmp_path_factory.mktemp("weights") / "demo.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


# tool -> the arguments that name checkpoint ``M`` (the rest valid)
WITH_CHECKPOINT = {
    "predict": lambda m, tmp: ["--config-file", DEMO_CONFIG, "--input", tmp / "x.jpg", "--device", "cpu",
                               f"train.init_checkpoint={m}"],
    "visualize": lambda m, tmp: ["anchors", "--config-file", DEMO_CONFIG, "--output", tmp / "a.png", "--device",
                                 "cpu", f"train.init_checkpoint={m}"],
    "export_model": lambda m, tmp: ["--config-file", DEMO_CONFIG, "--format", "onnx", "--output", tmp / "m.onnx",
                                    f"train.init_checkpoint={m}"],
    "benchmark": lambda m, tmp: ["--config-file", DEMO_CONFIG, "--device", "cpu", "--skip-train",
                                 f"train.init_checkpoint={m}"],
    "analyze_model": lambda m, tmp: ["--config-file", DEMO_CONFIG, "--height", "64", "--width", "64",
                                     f"train.init_checkpoint={m}"],
    "convert_checkpoint": lambda m, tmp: ["--source", "original", m, tmp / "converted.pth"],
}


@pytest.mark.parametrize("tool", sorted(WITH_CHECKPOINT))
def test_missing_checkpoint(monkeypatch, tmp_path, tool):
    missing = tmp_path / "nowhere.pth"
    assert run_tool(monkeypatch, tool, *WITH_CHECKPOINT[tool](missing, tmp_path)) == \
        f"error: checkpoint {missing} does not exist"


@pytest.mark.parametrize("mode", ["eval-only", "train"])
def test_training_tool_missing_init_checkpoint(tmp_path, mode):
    """A subprocess for the training run (the real command line); in-process for --eval-only."""
    missing = tmp_path / "nowhere.pth"
    args = ["--config-file", DEMO_CONFIG, f"train.init_checkpoint={missing}", f"train.output_dir={tmp_path / 'out'}"]
    if mode == "train":
        assert run_subprocess("lazyconfig_train_net", *args) == f"error: checkpoint {missing} does not exist"
    else:
        with pytest.MonkeyPatch.context() as monkeypatch:
            assert run_tool(monkeypatch, "lazyconfig_train_net", "--eval-only", *args) == \
                f"error: checkpoint {missing} does not exist"


# (tool, what is missing) -> (the arguments naming the missing file X, the message)
MISSING_INPUT = {
    ("predict", "image"): (lambda x, m, tmp: ["--config-file", DEMO_CONFIG, "--input", x, "--device", "cpu",
                                              f"train.init_checkpoint={m}"], "error: --input {x} does not exist (neither a file nor a folder)"),
    ("predict", "config"): (lambda x, m, tmp: ["--config-file", x, "--input", tmp / "y.jpg",
                                               f"train.init_checkpoint={m}"], "error: config file {x} does not exist"),
    ("visualize", "image"): (lambda x, m, tmp: ["layers", x, "--config-file", DEMO_CONFIG, "--output", tmp / "l.png",
                                                f"train.init_checkpoint={m}"], "error: image file {x} does not exist"),
    ("visualize", "metrics"): (lambda x, m, tmp: ["curves", x, "--output", tmp / "c.png"],
                               "error: metrics file {x} does not exist"),
    ("export_model", "config"): (lambda x, m, tmp: ["--config-file", x, "--format", "onnx", "--output",
                                                    tmp / "m.onnx", f"train.init_checkpoint={m}"],
                                 "error: config file {x} does not exist"),
    ("benchmark", "config"): (lambda x, m, tmp: ["--config-file", x, "--device", "cpu"],
                              "error: config file {x} does not exist"),
    ("analyze_model", "config"): (lambda x, m, tmp: ["--config-file", x], "error: config file {x} does not exist"),
    ("convert_checkpoint", "config"): (lambda x, m, tmp: ["--source", "original", m, tmp / "c.pth", "--config", x],
                                       "error: config file {x} does not exist"),
    ("lazyconfig_train_net", "config"): (lambda x, m, tmp: ["--config-file", x],
                                         "error: config file {x} does not exist"),
    ("demo", "config"): (lambda x, m, tmp: ["--config-file", x, "--eval-only"], "error: config file {x} does not exist"),
}


@pytest.mark.parametrize("tool,what", sorted(MISSING_INPUT))
def test_missing_input(monkeypatch, tmp_path, demo_checkpoint, tool, what):
    args, message = MISSING_INPUT[tool, what]
    missing = tmp_path / f"nowhere.{ {'image': 'jpg', 'metrics': 'json'}.get(what, 'py') }"
    assert run_tool(monkeypatch, tool, *args(missing, demo_checkpoint, tmp_path)) == message.format(x=missing)


@pytest.mark.parametrize("kind", ["directory", "text", "truncated"])
def test_unreadable_checkpoint(monkeypatch, tmp_path, demo_checkpoint, kind):
    """A folder, a text file or a cut-off checkpoint given as train.init_checkpoint (DABDETRCheckpointer)."""
    path = tmp_path / "bad.pth"
    if kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("model weights: see the README\n")
    else:
        path.write_bytes(open(demo_checkpoint, "rb").read()[:4096])
    message = run_tool(monkeypatch, "analyze_model", *WITH_CHECKPOINT["analyze_model"](path, tmp_path))
    not_readable = f"error: checkpoint {path} is not a readable checkpoint file"
    if kind == "directory":
        assert message == f"error: checkpoint {path} is a directory, not a file"
    elif kind == "text":
        assert message == f"{not_readable} (it is neither a zip archive nor a pickle, as torch.save writes)"
    else:
        assert message.startswith(f"{not_readable} (damaged: RuntimeError: PytorchStreamReader failed"), message


def test_conversion_tool_text_file_and_unwritable_output(monkeypatch, tmp_path, demo_checkpoint):
    """The real command line once (a subprocess); an output that is a folder, in this process."""
    text = tmp_path / "notes.pth"
    text.write_text("not weights\n")
    last = run_subprocess("convert_checkpoint", "--source", "original", text, tmp_path / "out.pth")
    assert last == f"error: checkpoint {text} is not a readable checkpoint file (it is neither a zip archive nor a " \
                   "pickle, as torch.save writes)"
    assert run_tool(monkeypatch, "convert_checkpoint", "--source", "original", demo_checkpoint, tmp_path) == \
        f"error: output {tmp_path} is a directory; give a file name"


def test_visualize_output_under_a_file(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"iteration": 1, "total_loss": 1.0}\n')
    output = tmp_path / "file" / "curves.png"
    assert run_tool(monkeypatch, "visualize", "curves", metrics, "--output", output) == \
        f"error: --output {output} cannot be written: {tmp_path / 'file'} is a file, not a folder"


def test_file_problem_words(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    assert file_problem(tmp_path / "f") is None and output_problem(tmp_path / "new" / "f") is None
    assert file_problem(tmp_path / "nope") == "does not exist"
    assert file_problem(tmp_path) == "is a directory, not a file"
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as for a user without the permission
    assert file_problem(tmp_path / "f") == "cannot be read (permission denied)"
    assert output_problem(tmp_path / "f") == "exists and cannot be written (permission denied)"
    assert output_problem(tmp_path / "g") == f"cannot be written: the folder {tmp_path} is not writable"


@pytest.mark.parametrize("tool", ["analyze_model", "lazyconfig_train_net"])
def test_config_that_is_a_folder(monkeypatch, tmp_path, tool):
    folder = tmp_path / "configs.py"
    folder.mkdir()
    assert run_tool(monkeypatch, tool, "--config-file", folder) == f"error: config file {folder} is a directory, not a file"
