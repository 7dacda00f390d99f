"""A non-editable install works outside the repository: the wheel carries the model-zoo configs.

Builds the wheel from the package sources, installs it into a fresh virtual environment (reusing
this environment's torch and detectron2 through a path entry, not its editable dab_detr), and from a
folder outside the repository converts an original-layout checkpoint with the repository's
converter, evaluates it with ``--eval-only`` on a user config built from the packaged model zoo, and
runs ``dab_detr.Predictor`` on it.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import torch
from PIL import Image

from reference_models import original_checkpoint, random_original_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, cwd, env=None):
    """stdout and stderr of ``cmd``, which must succeed."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def _build_and_install(tmp_path):
    """The wheel built from a copy of the sources (no build/ left in the repository), installed
    into ``tmp_path/venv``; returns that venv's python."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    for name in ("dab_detr", "configs"):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
          "-w", str(tmp_path / "wheels")], cwd=tmp_path)
    (wheel,) = (tmp_path / "wheels").iterdir()
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp_path).strip()
    # torch, detectron2 and the rest from this environment: a plain path entry, so that its
    # editable dab_detr finder (a .pth import hook) is not loaded
    with open(os.path.join(site, "reused_environment.pth"), "w") as f:
        f.write(sysconfig.get_path("purelib") + "\n")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", site, str(wheel)],
         cwd=tmp_path)
    return python, site


def _coco_dataset(folder):
    """Two photographs-sized random images with COCO's 80 categories (ids as in COCO)."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    os.makedirs(folder / "images")
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i, (h, w) in enumerate([(72, 96), (96, 64)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.jpg")
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": h, "width": w})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [8, 8, 30, 40],
                            "area": 1200, "iscrowd": 0})
    categories = [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]
    with open(folder / "val.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


USER_CONFIG = """\
# A user's config outside the repository: the packaged model zoo's R50 on their COCO-format data.
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from dab_detr import model_zoo
from dab_detr.data.register import register_coco_detection

_base = model_zoo.get_config("configs/dab_detr_r50.py")
model, dataloader, optimizer, lr_multiplier, train = (
    _base.model, _base.dataloader, _base.optimizer, _base.lr_multiplier, _base.train)
dataloader.test.dataset.names = register_coco_detection("wheel_val", "{root}/val.json", "{root}/images")
dataloader.test.mapper.augmentation = [L(T.ResizeShortestEdge)(short_edge_length=96, max_size=128)]
dataloader.test.num_workers = 0
model.backbone.freeze_at = 0
train.output_dir = "{root}/eval"
train.device = "cpu"
"""

USER_SESSION = """\
import runpy, sys
import numpy as np
import dab_detr
from dab_detr import model_zoo


def run_tool(*argv):
    sys.argv = list(argv)
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        assert not e.code, f"{{argv[0]}} exited with {{e.code}}"


print("dab_detr from", dab_detr.__file__)
print("model zoo", model_zoo.get_config_file("dab_detr_r50.py"))
run_tool("{tools}/convert_checkpoint.py", "--source", "original", "original.pth", "converted.pth")
run_tool("{tools}/lazyconfig_train_net.py", "--config-file", "user_config.py", "--eval-only",
         "train.init_checkpoint=converted.pth")
predictor = dab_detr.Predictor("user_config.py", "converted.pth")
image = np.random.default_rng(1).integers(0, 255, (80, 100, 3), dtype=np.uint8)
instances = predictor(image)["instances"]
assert len(instances) > 0 and instances.pred_boxes.tensor.isfinite().all(), instances
print("predicted", len(instances), "boxes, image size", instances.image_size)
"""


def test_wheel_installed_outside_the_repository_converts_evaluates_and_predicts(tmp_path):
    python, site = _build_and_install(tmp_path)
    assert os.path.isfile(os.path.join(site, "dab_detr", "model_zoo", "configs", "dab_detr_r50.py"))
    work = tmp_path / "work"  # the user's folder, outside the repository
    work.mkdir()
    _coco_dataset(work)
    (work / "user_config.py").write_text(USER_CONFIG.format(root=work))
    torch.save(original_checkpoint(random_original_state_dict(), num_queries=300), work / "original.pth")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    out = _run([str(python), "-c", USER_SESSION.format(tools=os.path.join(REPO, "tools"))], cwd=work, env=env)
    assert f"dab_detr from {site}" in out, out  # the wheel, not the repository
    assert "--config-file configs/dab_detr_r50.py" in out, out  # the converter's evaluation command
    assert "Evaluation results for bbox" in out, out[-3000:]
    assert "predicted" in out and "image size (80, 100)" in out, out[-3000:]
