"""MMDetection 3.3.0's own DAB-DETR as a test reference, run in a SUBPROCESS (never imported by
the tests' process, never by package code).

    python tests/mmdet_reference.py MMDET_DIR WORK_DIR

``MMDET_DIR`` is the folder ``tools/setup_env.sh`` installs mmdet 3.3.0, mmengine 0.10.7 and
mmcv-lite 2.2.0 into (``pip install --target``, outside the venv's import path); it is put on
``sys.path`` of this process only. ``WORK_DIR`` holds ``inputs.pt`` (written by the test: BGR
uint8 images, their original sizes, the query-embedding values to force) and receives:

- ``mmdet_checkpoint.pth``: the random model in the format mmdet publishes (``{'meta',
  'state_dict'}``, legacy torch serialization, ``tools/model_converters/publish_model.py``);
- ``mmdet_outputs.pt``: every decoder layer's sigmoid scores and normalized boxes
  (``mode='tensor'``) and the final detections of ``model.predict(rescale=True)``.

Two in-memory shims (SPEC-mmdet section 0): mmcv-lite has no compiled ``mmcv._ext``, which
``mmcv.ops`` loads at import (DAB-DETR on CPU calls none of its functions): a stand-in module
whose functions raise when called; and ``mmdet/__init__.py`` refuses mmcv >= 2.2.0: mmcv reports
2.1.0 while mmdet is imported.
"""
import os
import sys
import types


class _NoCompiledOps(types.ModuleType):
    """Stands in for mmcv's compiled extension: any function of it raises when called."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"mmcv._ext.{name} is not available in mmcv-lite (called by the reference)")

        return unavailable


def import_mmdet(mmdet_dir: str):
    sys.path.insert(0, mmdet_dir)
    sys.modules["mmcv._ext"] = _NoCompiledOps("mmcv._ext")
    import mmcv

    real_version = mmcv.__version__
    mmcv.__version__ = "2.1.0"  # mmdet 3.3.0 asserts mmcv < 2.2.0; mmcv-lite 2.2.0 runs DAB-DETR
    try:
        import mmdet
        from mmdet.utils import register_all_modules
    finally:
        mmcv.__version__ = real_version
    register_all_modules()
    return mmdet


def main(mmdet_dir: str, work_dir: str) -> None:
    import torch

    mmdet = import_mmdet(mmdet_dir)
    from mmengine.config import Config
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample

    inputs = torch.load(os.path.join(work_dir, "inputs.pt"), weights_only=True)
    config = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "dab_detr",
                          "dab-detr_r50_8xb2-50e_coco.py")
    cfg = Config.fromfile(config)
    cfg.model.backbone.init_cfg = None  # would download ImageNet weights
    torch.manual_seed(int(inputs["seed"]))
    model = MODELS.build(cfg.model)
    model.init_weights()
    with torch.no_grad():
        # trained-looking values where the random init is degenerate: BN statistics and affine
        # (init 0/1), biases (init 0), PReLU slopes; the box head's last layer is zero at init
        g = torch.Generator().manual_seed(int(inputs["seed"]))
        for name, t in model.state_dict().items():
            if not t.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            elif name.endswith("running_mean") or name.endswith(".bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
            elif name.startswith("backbone.") and t.dim() == 1:  # BN weight
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
            elif name == "bbox_head.fc_reg.layers.2.weight":
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
            elif ".ffn.layers.0.1.weight" in name:  # PReLU
                t.copy_(0.25 + 0.05 * torch.randn(t.shape, generator=g))
        if "query_embedding" in inputs:  # anchors chosen by the test (e.g. saturated ones)
            model.query_embedding.weight.copy_(inputs["query_embedding"])
    model.eval()
    torch.save({"meta": {"mmdet_version": mmdet.__version__, "dataset_meta": {"classes": "coco (80)"}},
                "state_dict": model.state_dict()},
               os.path.join(work_dir, "mmdet_checkpoint.pth"), _use_new_zipfile_serialization=False)

    images = inputs["images_bgr"]  # list of uint8 [3, h, w], already at the test size
    samples = []
    for img, (orig_h, orig_w) in zip(images, inputs["original_sizes"]):
        h, w = img.shape[1:]
        samples.append(DetDataSample(metainfo=dict(
            img_shape=(h, w), ori_shape=(int(orig_h), int(orig_w)),
            scale_factor=(w / int(orig_w), h / int(orig_h)))))
    with torch.no_grad():
        data = model.data_preprocessor({"inputs": list(images), "data_samples": samples}, False)
        # every decoder layer: mode='tensor' returns the head's raw outputs
        layer_logits, layer_boxes = model(data["inputs"], data["data_samples"], mode="tensor")
        results = model.predict(data["inputs"], data["data_samples"], rescale=True)
    torch.save({
        "layer_scores": layer_logits.sigmoid(),  # [L, B, Q, 80]
        "layer_boxes": layer_boxes,  # [L, B, Q, 4] normalized (cx, cy, w, h)
        "scores": [r.pred_instances.scores for r in results],
        "labels": [r.pred_instances.labels for r in results],
        "boxes": [r.pred_instances.bboxes for r in results],  # xyxy, original-image pixels, clipped
        "batch_input_shape": tuple(data["data_samples"][0].batch_input_shape),
    }, os.path.join(work_dir, "mmdet_outputs.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
