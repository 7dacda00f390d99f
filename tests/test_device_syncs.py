"""GPU readiness that a CPU can check: the forward passes read no tensor value back to Python.

On a GPU, every ``.item()``, ``bool(tensor)`` or Python branch on a tensor value waits for the
device. The training forward may read values in two places only: the checks of the ground truth
in ``prepare_targets`` (which run on the data loader's CPU tensors, before the copy to the device)
and the Hungarian matching (one host copy of the cost of all layers). Inference reads none. The
check counts ``aten._local_scalar_dense``, the operator behind every such read, and names the
caller of any other read. (``.tolist()`` and ``.numpy()`` of a CPU tensor read memory without an
operator, so they are not seen here; the CUDA test below catches them on a GPU.)
"""
import traceback

import pytest
import torch
from conftest import make_inputs, small_model_config
from detectron2.config import LazyConfig, instantiate
from detectron2.utils.events import EventStorage
from torch.utils._python_dispatch import TorchDispatchMode

DEFORMABLE_CONFIG = "configs/common/models/dab_deformable_detr_r50.py"
# functions allowed to read values during training: ground-truth checks on the loader's CPU tensors,
# the matching's host copy, and Detectron2's padding of the image batch (Python sizes)
ALLOWED_IN_TRAINING = {"prepare_targets", "match_layers", "from_tensors"}
ALLOWED_IN_INFERENCE = {"from_tensors"}


class ValueReads(TorchDispatchMode):
    """Records the call stack of every tensor value read back to Python."""

    def __init__(self):
        super().__init__()
        self.stacks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.stacks.append(traceback.extract_stack()[:-1])
        return func(*args, **(kwargs or {}))


def _reads_outside(stacks, allowed):
    """'file:line in function' of the innermost project frame of each read not under an allowed function."""
    bad = []
    for stack in stacks:
        if any(frame.name in allowed for frame in stack):
            continue
        ours = [f for f in stack if "/dab_detr/" in f.filename] or stack
        bad.append(f"{ours[-1].filename}:{ours[-1].lineno} in {ours[-1].name}")
    return bad


def _dab_detr(denoising=None):
    return instantiate(small_model_config(denoising=denoising))


def _deformable(denoising=None):
    cfg = LazyConfig.load(DEFORMABLE_CONFIG).model
    cfg.backbone.stages.depth = 18
    cfg.num_queries = 20
    cfg.transformer.update(num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=128)
    cfg.denoising = denoising
    return instantiate(cfg)


def _dab_detr_denoising():
    return _dab_detr({"groups": 3})


def _deformable_denoising():
    return _deformable({"groups": 3})


MODELS = pytest.mark.parametrize(
    "build", [_dab_detr, _deformable, _dab_detr_denoising, _deformable_denoising],
    ids=["dab_detr", "dab_deformable_detr", "dn_dab_detr", "dn_dab_deformable_detr"],
)
SIZES = [(96, 128), (80, 112)]  # padded batch: the attention masks are used


@MODELS
def test_training_forward_reads_values_only_in_target_checks_and_matching(build):
    torch.manual_seed(0)
    model = build().train()
    inputs = make_inputs(SIZES, num_classes=model.num_classes)
    reads = ValueReads()
    with EventStorage(), reads:
        losses = model(inputs)
    assert all(torch.isfinite(v) for v in losses.values())
    assert reads.stacks, "the matching reads its cost: the check must see it"
    assert _reads_outside(reads.stacks, ALLOWED_IN_TRAINING) == []
    # the backward reads nothing either
    backward_reads = ValueReads()
    with backward_reads:
        sum(losses.values()).backward()
    assert _reads_outside(backward_reads.stacks, set()) == []


@MODELS
def test_inference_reads_no_values(build):
    torch.manual_seed(0)
    model = build().eval()
    reads = ValueReads()
    with torch.no_grad(), reads:
        outputs = model(make_inputs(SIZES, num_classes=model.num_classes, with_targets=False))
    assert len(outputs) == 2 and len(outputs[0]["instances"]) > 0
    assert _reads_outside(reads.stacks, ALLOWED_IN_INFERENCE) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@MODELS
def test_cuda_network_forward_and_backward_do_not_synchronize(build):
    """On a GPU: the network (backbone, transformer, heads) runs forward and backward with
    synchronization reported as an error."""
    torch.manual_seed(0)
    model = build().cuda().train()
    inputs = make_inputs(SIZES, num_classes=model.num_classes)
    images = model.preprocess_image(inputs)
    padding_mask = model.padding_mask(images)
    targets = model.prepare_targets(inputs, images)  # what query denoising noises
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outputs = model.predict(images.tensor, padding_mask, padded=True, targets=targets)
        (outputs["pred_logits"].sum() + outputs["pred_boxes"].sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
