"""dab_detr.cpu_allocator: with "keep", a large tensor freed and allocated again is not
page-faulted in afresh; "system" leaves glibc alone or restores its behaviour; a wrong
DAB_DETR_CPU_ALLOCATOR is an error naming the variable, in the library and in the tools. The
allocator setting is process-wide, so the fault counts run in subprocesses."""
import logging
import os
import subprocess
import sys

import pytest

from conftest import REPO
from dab_detr import cpu_allocator
from dab_detr.cpu_allocator import ENV_VAR, configure_cpu_allocator

# a 64 MB tensor (over glibc's largest mmap threshold, 32 MB) allocated, written and freed 8 times:
# the minor page faults of the last one (glibc's heap reaches its steady state within a few rounds
# of PyTorch's aligned allocations)
_FAULTS = """
import resource, sys, torch
from dab_detr.cpu_allocator import configure_cpu_allocator
changed = [configure_cpu_allocator(mode) for mode in sys.argv[1:]]

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

for _ in range(8):
    before = faults()
    x = torch.empty(16 * 2**20).fill_(1.0)
    last = faults() - before
    del x
print(changed, last)
"""


def _faults(*modes):
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "LD_PRELOAD")}
    done = subprocess.run([sys.executable, "-c", _FAULTS, *modes], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    changed, faults = done.stdout.strip().rsplit("]", 1)
    return changed + "]", int(faults)


@pytest.mark.skipif(cpu_allocator._glibc() is None, reason="glibc's malloc only")
def test_keep_reuses_freed_memory_and_system_restores_glibc():
    changed_system, faults_system = _faults("system")  # glibc untouched: every page faulted in again
    changed_keep, faults_keep = _faults("keep")
    changed_back, faults_back = _faults("keep", "system")  # keep, then glibc's behaviour again
    assert (changed_system, changed_keep, changed_back) == ("[False]", "[True]", "[True, True]")
    # 64 MB = 16,384 pages of 4 KB (32 huge pages where transparent huge pages are always on)
    assert faults_keep < 200, faults_keep
    assert faults_system >= 10 * max(faults_keep, 1), (faults_system, faults_keep)
    assert faults_back >= 10 * max(faults_keep, 1), (faults_back, faults_keep)


def test_wrong_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "Keeep")
    with pytest.raises(ValueError, match=r"DAB_DETR_CPU_ALLOCATOR: unknown CPU allocator mode 'Keeep'; "
                                         r"expected one of keep, system"):
        configure_cpu_allocator()
    with pytest.raises(ValueError, match="argument: unknown CPU allocator mode 'fast'"):
        configure_cpu_allocator("fast")


def test_system_by_default_in_this_test_process_changes_nothing(monkeypatch):
    # conftest sets DAB_DETR_CPU_ALLOCATOR=system for the test process; nothing was changed before
    monkeypatch.setattr(cpu_allocator, "_changed", False)
    assert configure_cpu_allocator() is False


def test_other_allocator_or_no_glibc_left_alone(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="dab_detr.cpu_allocator")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert configure_cpu_allocator("keep") is False
    assert "jemalloc is preloaded" in caplog.text
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setattr(cpu_allocator, "_glibc", lambda: None)
    assert configure_cpu_allocator("keep") is False
    assert "not glibc" in caplog.text


@pytest.mark.parametrize("tool, args", [("lazyconfig_train_net.py", ["train.output_dir={out}"]),
                                        ("predict.py", ["--input", "x.jpg"])])
def test_tools_exit_with_the_variable_named(tool, args, tmp_path):
    env = dict(os.environ, **{ENV_VAR: "on"})
    args = [a.format(out=tmp_path / "out") for a in args]
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", tool), "--config-file", "configs/dab_detr_demo.py",
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "error: DAB_DETR_CPU_ALLOCATOR: unknown CPU allocator mode 'on'" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
