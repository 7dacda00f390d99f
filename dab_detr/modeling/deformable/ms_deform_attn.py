"""Multi-scale deformable attention (Deformable DETR), in plain PyTorch.

All sampling goes through one function, :func:`multi_scale_deformable_attention`, so that a
faster kernel (the CUDA op of Deformable DETR, for instance) can replace it without touching the
module around it. It runs on CPU and GPU and is differentiable through ``grid_sample``.
"""
import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

SpatialShapes = Union[torch.Tensor, Sequence[Tuple[int, int]]]


def _as_shape_list(spatial_shapes: SpatialShapes) -> list:
    if isinstance(spatial_shapes, torch.Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    # a list is kept as given: its sizes may be symbolic (torch.export), which int() would fix
    return [(h, w) for h, w in spatial_shapes]


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinear samples of each head's multi-level value maps.

    Args:
        value: [B, S, M, D], the flattened value maps of all levels (row-major per level, levels
            concatenated), M heads of D channels. S = sum of h_l * w_l.
        spatial_shapes: [L, 2] long tensor (or list of pairs) of (h_l, w_l).
        sampling_locations: [B, Lq, M, L, P, 2], (x, y) normalized to [0, 1] over the **padded**
            map of each level. Any value is allowed; the map is zero outside.
        attention_weights: [B, Lq, M, L, P], already normalized (softmax over L * P).

    Returns:
        [B, Lq, M * D]: for head m, sum over (l, p) of weight * sample; heads concatenated.

    The sampling rule is the one of the Deformable DETR CUDA kernel: pixel coordinate
    ``loc * size - 0.5``, bilinear interpolation, corners outside the map count as zero. That is
    exactly ``grid_sample(align_corners=False, padding_mode="zeros")`` on the grid ``2 * loc - 1``.
    """
    batch, num_keys, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = _as_shape_list(spatial_shapes)
    if len(shapes) != num_levels:
        raise ValueError(
            f"spatial_shapes has {len(shapes)} levels but sampling_locations has {num_levels}"
        )
    if sum(h * w for h, w in shapes) != num_keys:
        raise ValueError(
            f"value has {num_keys} positions but spatial_shapes {shapes} sum to "
            f"{sum(h * w for h, w in shapes)}"
        )
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample needs one dtype; under mixed precision the value maps decide (fp32 locations
    # added to fp16 offsets would otherwise meet fp16 values)
    grids = (2 * sampling_locations - 1).to(value.dtype)
    # [B, Lq, M, L, P] -> [B*M, 1, Lq, L, P]
    weights = attention_weights.transpose(1, 2).reshape(batch * num_heads, 1, num_queries, num_levels, num_points)
    weights = weights.to(value.dtype)
    # Speed: the weighted sum is accumulated level by level instead of stacking every level's
    # samples into one [B*M, D, Lq, L*P] tensor (that stack and its product were as costly as the
    # sampling itself); without autograd the samples are weighted in place. Same sum, same order
    # within a level; levels are added one after the other (equal to 1e-6 relative).
    in_place = not (torch.is_grad_enabled() and (value.requires_grad or attention_weights.requires_grad
                                                 or sampling_locations.requires_grad))
    output = None
    for level, (h, w) in enumerate(shapes):
        # [B, h*w, M, D] -> [B*M, D, h, w]
        value_l = value_per_level[level].permute(0, 2, 3, 1).reshape(batch * num_heads, head_dim, h, w)
        # [B, Lq, M, P, 2] -> [B*M, Lq, P, 2]
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # [B*M, D, Lq, P]
        samples = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        weights_l = weights[:, :, :, level]  # [B*M, 1, Lq, P]
        weighted = samples.mul_(weights_l) if in_place else samples * weights_l
        level_sum = weighted.sum(-1)  # [B*M, D, Lq]
        output = level_sum if output is None else output.add_(level_sum) if in_place else output + level_sum
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (names as in Deformable DETR's checkpoints).

    Args:
        d_model: channels of queries and values (256).
        n_levels: number of feature levels L (4).
        n_heads: number of heads M (8); d_model must be divisible by it.
        n_points: sampling points per head and level P (4).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        """Initialization of Deformable DETR (SPEC-deformable section 3).

        Offsets start at zero weight and a bias that puts point p of head h at (p + 1) times the
        unit direction of angle 2*pi*h/M (scaled so that its larger component is 1); attention
        starts uniform; value and output projections are Xavier-uniform with zero bias.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        directions = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        directions = directions * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(directions.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: SpatialShapes,
        input_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: [B, Lq, C].
            reference_points: [B, Lq, L, 2] points (x, y) or [B, Lq, L, 4] boxes (cx, cy, w, h),
                normalized to [0, 1] over the padded map of each level.
            input_flatten: [B, S, C], the flattened multi-level features (values).
            spatial_shapes: [L, 2] long tensor (or list of pairs) of (h_l, w_l).
            input_padding_mask: [B, S] bool, True on padding (those values are zeroed).

        Returns:
            [B, Lq, C].

        Point references move by ``offset / (w_l, h_l)`` (offsets in pixels of each level); box
        references move by ``offset / P * (w, h) / 2``, so the initial bias puts the last point
        on the box edge.
        """
        batch, num_queries, _ = query.shape
        num_keys = input_flatten.shape[1]
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            # in place on the projection's fresh output (its backward does not need it): one
            # [B, S, C] tensor less
            value = value.masked_fill_(input_padding_mask[..., None], 0.0)
        value = value.view(batch, num_keys, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2
        )
        weights = self.attention_weights(query).view(
            batch, num_queries, self.n_heads, self.n_levels * self.n_points
        )
        weights = weights.softmax(-1).view(batch, num_queries, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # torch.tensor, not new_tensor: it keeps symbolic sizes symbolic under torch.export
            normalizer = torch.tensor([(w, h) for h, w in _as_shape_list(spatial_shapes)],
                                      dtype=offsets.dtype, device=offsets.device)
            locations = (
                reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points must end in 2 (points) or 4 (boxes), got shape {tuple(reference_points.shape)}"
            )
        output = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
        return self.output_proj(output)

