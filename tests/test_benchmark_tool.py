"""tools/benchmark.py runs end to end at a tiny size: ours against transformers' port, under both CPU
allocator settings, inference and training, and the time by group. The speed itself is not
asserted here (targets live in the benchmark's printout, measured on a quiet machine): this checks
that every line the README's commands rely on is printed, with finite positive numbers."""
import math
import os
import re
import subprocess
import sys

from conftest import REPO


def test_compare_both_allocators_and_groups():
    cmd = [sys.executable, os.path.join(REPO, "tools", "benchmark.py"), "--config-file", "configs/dab_detr_r50.py",
           "--compare", "transformers", "--height", "96", "--width", "128", "--iters", "1", "--warmup", "0",
           "--cpu-allocator", "both", "--threads", "2", "--groups"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for kind in ("inference", "training step"):
        for model in ("ours", "transformers"):
            for mode in ("keep", "system"):
                line = re.search(rf"{kind} +{model} \({mode}\): +([\d.]+) ms/batch .*?([\d.]+) GFLOP/s, "
                                 rf"peak memory ([\d.]+) GiB", out)
                assert line, (kind, model, mode, out)
                ms, gflops, _ = map(float, line.groups())
                assert ms > 0 and gflops > 0 and math.isfinite(ms)
        for mode in ("keep", "system"):
            ratio = re.search(rf"{kind} +speed-up ours vs transformers \({mode} allocator\): ([\d.]+)x", out)
            assert ratio and float(ratio.group(1)) > 0, (kind, mode, out)
    groups = re.findall(r"^ +(default|fast_backbone=False): backbone ([\d.]+), encoder ([\d.]+), decoder ([\d.]+), "
                        r"rest (-?[\d.]+), total ([\d.]+)$", out, re.M)
    assert [g[0] for g in groups] == ["default", "fast_backbone=False"], out
    for _, backbone, encoder, decoder, rest, total in groups:
        assert math.isclose(float(backbone) + float(encoder) + float(decoder) + float(rest), float(total), abs_tol=2e-3)
