"""The transformers ignore padding: padded rows at the bottom or padded columns at the right, filled
with garbage and marked in the mask, do not change the outputs for the valid image.

What is invariant, and to what (read before changing a comparison):
- DAB-DETR's transformer, and DAB-Deformable-DETR's encoder and two-stage proposals (scores,
  top-k selection, proposal boxes and features), do not depend on the amount of padding at all:
  they are compared with the same feature maps given without padding.
- DAB-Deformable-DETR's decoder does depend on the amount of padding, by design of the original
  (and of detrex): the anchors are scaled by each level's valid ratio and the positional query
  is the sine embedding of the level-0 scaled anchor. Its outputs are therefore compared with the
  same image under the same mask (same valid ratios) but other padding content, and with the
  same padded image alone instead of in a batch with an image padded on the other side.
- The full models: the backbone sees the padded pixels (its receptive field crosses the border),
  so a padded image is compared with itself alone on the same canvas (batch independence).

Small random models (d_model 64, 2 + 2 layers, 3 levels) keep the file to seconds on CPU. All
comparisons are float32 and hold to TOL (observed differences are below 2.5e-6).
"""
import pytest
import torch
from torch import nn

from detectron2.config import LazyConfig, instantiate
from detectron2.structures import ImageList

from dab_detr.modeling.deformable.deformable_transformer import DABDeformableTransformer
from dab_detr.modeling.mlp import MLP
from dab_detr.modeling.position_encoding import PositionEmbeddingSine
from dab_detr.modeling.transformer import DABTransformer

TOL = 1e-5
D, LEVELS, QUERIES = 64, 3, 12
SHAPES = [(12, 10), (6, 5), (3, 3)]  # valid (h, w) per level, finest first
EXTRA = 3  # padded rows (bottom) or columns (right) added to every level
SIDES = ["bottom", "right"]


def max_diff(a, b):
    return (a - b).abs().max().item()


def pad(x, side, amount, seed):
    """x [B, C, h, w] -> (x padded with garbage on ``side``, mask [B, H, W] True on padding)."""
    b, c, h, w = x.shape
    rows, cols = (h + amount, w) if side == "bottom" else (h, w + amount)
    g = torch.Generator().manual_seed(seed)
    out = 10.0 * torch.randn(b, c, rows, cols, generator=g)  # garbage, large on purpose
    out[..., :h, :w] = x
    mask = torch.ones(b, rows, cols, dtype=torch.bool)
    mask[:, :h, :w] = False
    return out, mask


def valid_tokens(tensor, masks):
    """[B, S, ...] flattened over levels -> the valid tokens of image 0, level-major row-major."""
    flat_mask = torch.cat([m.flatten(1) for m in masks], 1)
    return tensor[0][~flat_mask[0]]


def perturb(module, std=0.05, seed=0):
    """Add noise to every parameter so that no zero-initialized projection hides a dependence."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return module


# ----------------------------------------------------------------------------- deformable
def deformable(two_stage):
    torch.manual_seed(0)
    t = DABDeformableTransformer(d_model=D, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                                 dim_feedforward=128, num_feature_levels=LEVELS, enc_n_points=2,
                                 dec_n_points=2, two_stage=two_stage, two_stage_num_proposals=QUERIES)
    heads = nn.ModuleDict({
        "bbox": nn.ModuleList(MLP(D, D, 4, 3) for _ in range(3)),
        "cls": nn.Linear(D, 5),
        "content": nn.Embedding(QUERIES, D),
        "anchors": nn.Embedding(QUERIES, 4),
    })
    return perturb(t).eval(), perturb(heads, seed=1).eval()


DEFORMABLE_PE = PositionEmbeddingSine(D // 2, temperature_h=10000.0, temperature_w=10000.0, offset=-0.5)


def run_deformable(model, srcs, masks):
    transformer, heads = model
    pos = [DEFORMABLE_PE(m) for m in masks]
    if transformer.two_stage:
        kwargs = dict(proposal_class_embed=heads["cls"], proposal_bbox_embed=heads["bbox"][2])
    else:
        kwargs = dict(query_content=heads["content"].weight, query_anchors=heads["anchors"].weight)
    with torch.no_grad():
        memory_spy = {}
        hook = transformer.encoder.register_forward_hook(lambda m, i, o: memory_spy.update(memory=o))
        try:
            out = transformer(srcs, masks, pos, heads["bbox"], **kwargs)
        finally:
            hook.remove()
        out["logits"] = heads["cls"](out["hs"])
    return {**out, "memory": memory_spy["memory"]}


def random_features(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, D, h, w, generator=g) for h, w in SHAPES]


def padded(srcs, side, amount=EXTRA, seed=1):
    pairs = [pad(s, side, amount, seed + lvl) for lvl, s in enumerate(srcs)]
    return [p for p, _ in pairs], [m for _, m in pairs]


def unpadded(srcs):
    return srcs, [torch.zeros(s.shape[0], *s.shape[-2:], dtype=torch.bool) for s in srcs]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("two_stage", [False, True], ids=["one_stage", "two_stage"])
def test_deformable_encoder_ignores_the_amount_of_padding(two_stage, side):
    model = deformable(two_stage)
    srcs = random_features()
    ref = run_deformable(model, *unpadded(srcs))
    srcs_p, masks_p = padded(srcs, side)
    out = run_deformable(model, srcs_p, masks_p)
    assert max_diff(valid_tokens(out["memory"], masks_p), ref["memory"][0]) < TOL


@pytest.mark.parametrize("side", SIDES)
def test_two_stage_proposals_and_top_k_ignore_the_amount_of_padding(side):
    """Same top-k proposals (scores, boxes relative to the valid image, features) in the same order."""
    model = deformable(True)
    transformer, heads = model
    srcs = random_features()
    ref = run_deformable(model, *unpadded(srcs))
    srcs_p, masks_p = padded(srcs, side)
    out = run_deformable(model, srcs_p, masks_p)
    # the order of the top-k is only defined where scores are apart: a trained model's neighbouring
    # scores can be 1e-6 apart, where float rounding may swap two queries (same set, other order)
    shapes = torch.tensor(SHAPES)
    with torch.no_grad():
        features, _ = transformer.encoder_proposals(ref["memory"], torch.zeros(1, shapes.prod(1).sum().item(),
                                                                               dtype=torch.bool), shapes)
        scores = heads["cls"](features).max(-1)[0].topk(QUERIES + 1, dim=1)[0]
    assert (scores[:, :-1] - scores[:, 1:]).min() > 100 * TOL, "near-tied scores: choose another seed"
    for key in ("enc_boxes", "enc_memory", "init_reference"):
        assert max_diff(out[key], ref[key]) < TOL, (key, max_diff(out[key], ref[key]))
    assert max_diff(heads["cls"](out["enc_memory"]), heads["cls"](ref["enc_memory"])) < TOL


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("two_stage", [False, True], ids=["one_stage", "two_stage"])
def test_deformable_decoder_ignores_padding_content(two_stage, side):
    """Same mask (so same valid ratios), other garbage in the padding: every layer is unchanged."""
    model = deformable(two_stage)
    srcs = random_features()
    ref = run_deformable(model, *padded(srcs, side, seed=1))
    out = run_deformable(model, *padded(srcs, side, seed=100))
    for key in ("boxes", "logits", "hs"):
        assert max_diff(out[key], ref[key]) < TOL, (key, max_diff(out[key], ref[key]))


@pytest.mark.parametrize("side", SIDES)
def test_two_stage_proposals_of_padded_tokens_ignore_padding_content(side):
    """Every token's proposal feature and box, padded ones included (they compete in the top-k),
    is unchanged by other garbage in the padding under the same mask."""
    model = deformable(True)
    transformer = model[0]
    srcs = random_features()
    results = []
    for seed in (1, 100):
        srcs_p, masks_p = padded(srcs, side, seed=seed)
        out = run_deformable(model, srcs_p, masks_p)
        shapes = torch.tensor([m.shape[-2:] for m in masks_p])
        mask_flat = torch.cat([m.flatten(1) for m in masks_p], 1)
        with torch.no_grad():
            results.append(transformer.encoder_proposals(out["memory"], mask_flat, shapes))
    (feat_a, boxes_a), (feat_b, boxes_b) = results
    torch.testing.assert_close(feat_a, feat_b, atol=TOL, rtol=0)
    torch.testing.assert_close(boxes_a, boxes_b, atol=TOL, rtol=0)  # +inf on padding in both


@pytest.mark.parametrize("two_stage", [False, True], ids=["one_stage", "two_stage"])
def test_deformable_padded_batch_equals_each_image_alone(two_stage):
    """Image 0 padded at the bottom and image 1 padded at the right share one canvas; each
    image's outputs (every decoder layer, and the two-stage proposals) equal those of the same
    padded image run alone."""
    model = deformable(two_stage)
    a = [s[..., : s.shape[-2] - 2, :] for s in random_features(seed=3)]  # short: bottom padding
    b = [s[..., :, : s.shape[-1] - 2] for s in random_features(seed=4)]  # narrow: right padding
    srcs, masks = [], []
    for sa, sb in zip(a, b):
        h, w = max(sa.shape[-2], sb.shape[-2]), max(sa.shape[-1], sb.shape[-1])
        pa, ma = pad(sa, "bottom", h - sa.shape[-2], seed=5)
        pb, mb = pad(sb, "right", w - sb.shape[-1], seed=6)
        srcs.append(torch.cat([pa, pb]))
        masks.append(torch.cat([ma, mb]))
    batch = run_deformable(model, srcs, masks)
    keys = ["boxes", "logits"] + (["enc_boxes", "enc_memory"] if two_stage else [])
    for i, side in enumerate(["bottom", "right"]):
        alone = run_deformable(model, [s[i:i + 1] for s in srcs], [m[i:i + 1] for m in masks])
        for key in keys:
            got = batch[key][:, i] if key in ("boxes", "logits") else batch[key][i]
            want = alone[key][:, 0] if key in ("boxes", "logits") else alone[key][0]
            assert max_diff(got, want) < TOL, (side, key, max_diff(got, want))


# ----------------------------------------------------------------------------- DAB-DETR
@pytest.mark.parametrize("side", SIDES)
def test_dab_detr_transformer_ignores_the_amount_of_padding(side):
    torch.manual_seed(0)
    transformer = perturb(DABTransformer(d_model=D, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                                         dim_feedforward=128)).eval()
    bbox_embed = perturb(MLP(D, D, 4, 3), seed=1).eval()
    anchors = torch.randn(QUERIES, 4)
    pe = PositionEmbeddingSine(D // 2)
    src = random_features()[0]
    src_p, mask_p = pad(src, side, EXTRA, seed=2)
    mask = torch.zeros(1, *src.shape[-2:], dtype=torch.bool)
    with torch.no_grad():
        ref_hidden, ref_refs = transformer(src, mask, pe(mask), anchors, bbox_embed)
        hidden, refs = transformer(src_p, mask_p, pe(mask_p), anchors, bbox_embed)
    assert max_diff(hidden, ref_hidden) < TOL
    assert max_diff(refs, ref_refs) < TOL


# ----------------------------------------------------------------------------- full models
def small_model(config, **transformer):
    cfg = LazyConfig.load(config)
    cfg.model.backbone.stages.depth = 18
    cfg.model.backbone.stages.stride_in_1x1 = False
    cfg.model.position_embedding.num_pos_feats = D // 2
    cfg.model.num_queries = QUERIES
    for key, value in dict(d_model=D, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=128,
                           **transformer).items():
        setattr(cfg.model.transformer, key, value)
    torch.manual_seed(0)
    return instantiate(cfg.model).eval()


@pytest.mark.parametrize("name,config,transformer", [
    ("dab_detr", "configs/common/models/dab_detr_r50.py", {}),
    ("deformable", "configs/common/models/dab_deformable_detr_r50.py", {}),
    ("deformable_two_stage", "configs/common/models/dab_deformable_detr_r50.py", {"two_stage": True}),
])
def test_full_model_padded_batch_equals_each_padded_image_alone(name, config, transformer):
    """(h, w) = (72, 56) padded at the right and (56, 72) padded at the bottom, one ImageList: each
    image's every-layer logits and boxes equal those of the same padded image run alone."""
    model = small_model(config, **transformer)
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.rand(3, h, w, generator=g) * 255} for h, w in [(72, 56), (56, 72)]]
    images = model.preprocess_image(inputs)
    assert isinstance(images, ImageList)
    mask = model.padding_mask(images)
    with torch.no_grad():
        batch = model.predict(images.tensor, mask)
        for i, side in enumerate(["right", "bottom"]):
            alone = model.predict(images.tensor[i:i + 1], mask[i:i + 1])
            layers = batch["aux_outputs"] + [batch]
            alone_layers = alone["aux_outputs"] + [alone]
            if "enc_outputs" in batch:
                layers, alone_layers = layers + [batch["enc_outputs"]], alone_layers + [alone["enc_outputs"]]
            for k, (got, want) in enumerate(zip(layers, alone_layers)):
                for key in ("pred_logits", "pred_boxes"):
                    diff = max_diff(got[key][i], want[key][0])
                    assert diff < TOL, (name, side, k, key, diff)
