"""Multi-scale deformable attention against two independent implementations.

1. The pure-PyTorch ``MultiScaleDeformableAttention`` of the transformers package's Deformable
   DETR (test-only dependency; skipped when transformers is missing).
2. A plain Python loop with explicit bilinear interpolation following the CUDA kernel's rule:
   pixel coordinate ``loc * size - 0.5``, corners outside the map contribute zero.
"""
import math

import pytest
import torch

from dab_detr.modeling.deformable.ms_deform_attn import MSDeformAttn, multi_scale_deformable_attention

SHAPES = [(7, 9), (4, 5), (2, 3)]


def _loop_reference(value, shapes, locations, weights):
    """value [B,S,M,D], locations [B,Q,M,L,P,2], weights [B,Q,M,L,P] -> [B,Q,M*D] (float64)."""
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads, dim, dtype=torch.float64)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for lvl, (h, w) in enumerate(shapes):
                    vmap = value[b, starts[lvl] : starts[lvl] + h * w, m].double().view(h, w, dim)
                    for p in range(points):
                        x = locations[b, q, m, lvl, p, 0].item() * w - 0.5
                        y = locations[b, q, m, lvl, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        fx, fy = x - x0, y - y0
                        sample = torch.zeros(dim, dtype=torch.float64)
                        for yy, xx, cw in (
                            (y0, x0, (1 - fy) * (1 - fx)),
                            (y0, x0 + 1, (1 - fy) * fx),
                            (y0 + 1, x0, fy * (1 - fx)),
                            (y0 + 1, x0 + 1, fy * fx),
                        ):
                            if 0 <= yy < h and 0 <= xx < w:
                                sample += cw * vmap[yy, xx]
                        out[b, q, m] += weights[b, q, m, lvl, p].item() * sample
    return out.flatten(2)


def _random_inputs(seed, batch=2, queries=5, heads=2, dim=3, points=3, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    num_keys = sum(h * w for h, w in shapes)
    value = torch.randn(batch, num_keys, heads, dim, generator=g)
    # many points outside [0, 1]: the map must read as zero there
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=g) * 1.6 - 0.3
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=g)
    weights = weights / weights.flatten(-2).sum(-1)[..., None, None]
    return value, locations, weights


def test_matches_explicit_bilinear_loop_including_outside_points():
    value, locations, weights = _random_inputs(0)
    # edge cases of the kernel rule: pixel coordinate exactly -1, exactly size, exactly a centre,
    # and far outside
    h, w = SHAPES[0]
    locations[0, 0, 0, 0, 0] = torch.tensor([-0.5 / w, -0.5 / h])  # pixel (-1, -1): zero
    locations[0, 0, 0, 0, 1] = torch.tensor([(w + 0.5) / w, 0.5])  # x pixel = w: zero
    locations[0, 0, 1, 0, 0] = torch.tensor([2.5 / w, 3.5 / h])  # exactly pixel (2, 3)
    locations[1, 1, 0, 1, 2] = torch.tensor([5.0, -4.0])
    spatial_shapes = torch.tensor(SHAPES, dtype=torch.long)
    ours = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
    expected = _loop_reference(value, SHAPES, locations, weights)
    assert ours.shape == (2, 5, 2 * 3)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)
    # a point exactly on a pixel centre samples that pixel
    single = torch.zeros_like(weights)
    single[0, 0, 1, 0, 0] = 1.0
    one = multi_scale_deformable_attention(value, spatial_shapes, locations, single)
    torch.testing.assert_close(one[0, 0, 3:6], value[0, 3 * w + 2, 1])


def test_matches_transformers_pure_pytorch_implementation():
    modeling = pytest.importorskip("transformers.models.deformable_detr.modeling_deformable_detr")
    value, locations, weights = _random_inputs(1, batch=3, queries=11, heads=8, dim=32, points=4,
                                               shapes=[(13, 17), (7, 9), (4, 5), (2, 3)])
    shapes = [(13, 17), (7, 9), (4, 5), (2, 3)]
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    level_start = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
    theirs = modeling.MultiScaleDeformableAttention().forward(
        value, spatial_shapes, shapes, level_start, locations, weights, 64
    )
    ours = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_padded_map_equals_unpadded_map():
    """Zero-padding the value maps at the bottom/right (what a padded batch does) changes
    nothing once the sampling locations are re-normalized to the padded size."""
    value, locations, weights = _random_inputs(2, batch=1)
    padded_shapes = [(h + 3, w + 2) for h, w in SHAPES]
    pieces, start = [], 0
    for (h, w), (hp, wp) in zip(SHAPES, padded_shapes):
        grid = value[:, start : start + h * w].view(1, h, w, *value.shape[2:])
        big = torch.zeros(1, hp, wp, *value.shape[2:])
        big[:, :h, :w] = grid
        pieces.append(big.flatten(1, 2))
        start += h * w
    padded_value = torch.cat(pieces, 1)
    scale = torch.tensor([[w / wp, h / hp] for (h, w), (hp, wp) in zip(SHAPES, padded_shapes)])
    padded_locations = locations * scale[None, None, None, :, None, :]
    out = multi_scale_deformable_attention(value, torch.tensor(SHAPES), locations, weights)
    out_padded = multi_scale_deformable_attention(
        padded_value, torch.tensor(padded_shapes), padded_locations, weights
    )
    torch.testing.assert_close(out_padded, out, rtol=1e-5, atol=1e-6)


def _module_loop_reference(attn, query, reference_points, feats, shapes, mask):
    """MSDeformAttn written out from SPEC-deformable 2.5 with the loop sampler."""
    heads, levels, points = attn.n_heads, attn.n_levels, attn.n_points
    batch, queries, channels = query.shape
    value = feats @ attn.value_proj.weight.T + attn.value_proj.bias
    value = torch.where(mask[..., None], torch.zeros_like(value), value)
    value = value.view(batch, -1, heads, channels // heads)
    offsets = (query @ attn.sampling_offsets.weight.T + attn.sampling_offsets.bias).view(
        batch, queries, heads, levels, points, 2
    )
    logits = (query @ attn.attention_weights.weight.T + attn.attention_weights.bias).view(
        batch, queries, heads, levels * points
    )
    weights = torch.softmax(logits, -1).view(batch, queries, heads, levels, points)
    locations = torch.empty_like(offsets)
    for lvl, (h, w) in enumerate(shapes):
        for p in range(points):
            if reference_points.shape[-1] == 2:
                locations[:, :, :, lvl, p, 0] = reference_points[:, :, None, lvl, 0] + offsets[:, :, :, lvl, p, 0] / w
                locations[:, :, :, lvl, p, 1] = reference_points[:, :, None, lvl, 1] + offsets[:, :, :, lvl, p, 1] / h
            else:
                for k in range(2):
                    locations[:, :, :, lvl, p, k] = (
                        reference_points[:, :, None, lvl, k]
                        + offsets[:, :, :, lvl, p, k] / points * reference_points[:, :, None, lvl, 2 + k] * 0.5
                    )
    sampled = _loop_reference(value, shapes, locations, weights).float()
    return sampled @ attn.output_proj.weight.T + attn.output_proj.bias


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_on_padded_batch_matches_loop_reference(ref_dim):
    torch.manual_seed(3)
    shapes = [(5, 6), (3, 3)]
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    for p in attn.parameters():  # move away from the structured init
        torch.nn.init.normal_(p, std=0.5)
    num_keys = sum(h * w for h, w in shapes)
    feats = torch.randn(2, num_keys, 16)
    query = torch.randn(2, 4, 16)
    mask = torch.zeros(2, num_keys, dtype=torch.bool)
    mask[1, 4:6] = True  # padded columns of image 1 at level 0
    mask[1, 30 + 2] = True
    reference_points = torch.rand(2, 4, 2, ref_dim) * 1.2 - 0.1
    spatial_shapes = torch.tensor(shapes)
    out = attn(query, reference_points, feats, spatial_shapes, mask)
    expected = _module_loop_reference(attn, query, reference_points, feats, shapes, mask)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # padded values are ignored: garbage there changes nothing
    feats_garbage = feats.clone()
    feats_garbage[mask] = 1e3
    torch.testing.assert_close(attn(query, reference_points, feats_garbage, spatial_shapes, mask), out)


def test_initial_sampling_pattern_and_uniform_attention():
    attn = MSDeformAttn()
    bias = attn.sampling_offsets.bias.view(8, 4, 4, 2)
    expected_dirs = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]],
                                 dtype=torch.float32)
    for p in range(4):
        torch.testing.assert_close(bias[:, 2, p], expected_dirs * (p + 1), atol=1e-5, rtol=0)
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    assert torch.count_nonzero(attn.value_proj.bias) == 0


def test_bad_shapes_raise_clear_errors():
    value, locations, weights = _random_inputs(4)
    with pytest.raises(ValueError, match="spatial_shapes"):
        multi_scale_deformable_attention(value, torch.tensor([(7, 9), (4, 5), (2, 4)]), locations, weights)
    with pytest.raises(ValueError, match="levels"):
        multi_scale_deformable_attention(value, torch.tensor([(7, 9), (4, 5)]), locations, weights)
    attn = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=3)
    with pytest.raises(ValueError, match="reference_points"):
        attn(torch.randn(1, 2, 16), torch.rand(1, 2, 3, 3), torch.randn(1, 89, 16), torch.tensor(SHAPES))
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=20, n_heads=8)

