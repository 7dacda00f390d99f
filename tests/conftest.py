"""Shared fixtures: small DAB-DETR models and inputs for CPU tests."""
import functools
import importlib.util
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances

MODEL_CONFIG = "configs/common/models/dab_detr_r50.py"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tools run in-process by some tests would switch this whole test process's malloc to keeping
# freed memory (dab_detr/cpu_allocator.py); tests/test_cpu_allocator.py checks that in subprocesses
os.environ["DAB_DETR_CPU_ALLOCATOR"] = "system"
# under pytest-xdist (`make test` runs two workers) each worker and the tools it starts use one
# intra-op thread per core it owns instead of all cores: two workers x all cores would oversubscribe
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(_threads)


def load_tool(name: str):
    """A script of tools/ as a module, loaded by path (detectron2's wheel ships a stray top-level
    ``tools`` package, so ``import tools.x`` would find the wrong one; tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"dab_detr_tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def original_eps(monkeypatch):
    """transformers' DAB-DETR with the original's inverse-sigmoid eps (1e-3; the port uses 1e-5)."""
    from transformers.models.dab_detr import modeling_dab_detr

    monkeypatch.setattr(modeling_dab_detr, "inverse_sigmoid",
                        functools.partial(modeling_dab_detr.inverse_sigmoid, eps=1e-3))


def small_model_config(**overrides):
    """The R50 model config shrunk for fast CPU tests (ResNet-18, d_model 64, 2+2 layers, 12 queries)."""
    cfg = LazyConfig.load(MODEL_CONFIG).model
    cfg.backbone.stages.depth = 18
    cfg.backbone.freeze_at = 0
    cfg.transformer.update(d_model=64, nhead=8, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=128)
    cfg.position_embedding.num_pos_feats = 32
    cfg.num_queries = 12
    cfg.num_classes = 5
    for key, value in overrides.items():
        *path, last = key.split(".")
        target = cfg
        for part in path:
            target = target[part]
        target[last] = value
    return cfg


def make_inputs(sizes, num_classes=5, seed=0, with_targets=True):
    """Random 0-255 images of the given (H, W) sizes with two boxes each (one in the last image is empty)."""
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for i, (h, w) in enumerate(sizes):
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
        item = {"image": image, "file_name": f"img{i}.jpg"}
        if with_targets:
            inst = Instances((h, w))
            inst.gt_boxes = Boxes(torch.tensor([[0.1 * w, 0.2 * h, 0.6 * w, 0.7 * h],
                                                [0.5 * w, 0.1 * h, 0.9 * w, 0.4 * h]]))
            inst.gt_classes = torch.tensor([i % num_classes, (i + 1) % num_classes])
            item["instances"] = inst
        inputs.append(item)
    return inputs


@pytest.fixture
def small_model():
    torch.manual_seed(0)
    return instantiate(small_model_config())
