"""Sine position encodings: one for image feature maps, one for anchor boxes."""
import math

import torch
from torch import nn


def _sine_features(values: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """Interleaved sine/cosine features of already-scaled scalars.

    Args:
        values: [...], the scalars (already multiplied by the scale, e.g. 2*pi).
        num_feats: even number of output features F.
        temperature: base of the geometric frequency progression.

    Returns:
        [..., F] laid out as sin(v/t_0), cos(v/t_0), sin(v/t_1), cos(v/t_1), ... with
        t_i = temperature ** (2 * (i // 2) / F) (the layout of the original code).
    """
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=values.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = values[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """Normalized sine position embedding of an image feature map (no parameters).

    Positions are the cumulative count of non-padded pixels along each axis, so a padded image
    gets the same embedding on its valid region as the same image without padding.

    Args:
        num_pos_feats: features per axis (the output has 2x this many channels).
        temperature_h, temperature_w: frequency bases for the y and x axes. DAB-DETR uses 20 for
            both (the released plain R50-DC5 checkpoint needs 10); DETR and Deformable DETR use
            10000. Separate values for H and W follow the original code.
        normalize: divide positions by the valid extent and multiply by ``scale``.
        scale: range of the normalized positions (2*pi).
        eps: added to the valid extent before dividing.
        offset: subtracted from positions before normalizing (0 for DAB-DETR; -0.5 is the
            Deformable DETR convention, ``(cumsum - 0.5) / (extent + eps)``).
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature_h: float = 20.0,
        temperature_w: float = 20.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        eps: float = 1e-6,
        offset: float = 0.0,
    ):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w
        self.normalize = normalize
        self.scale = scale
        self.eps = eps
        self.offset = offset

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask: [B, H, W] bool, True on padding -> [B, 2 * num_pos_feats, H, W], cat(pos_y, pos_x)."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        pos_y = _sine_features(y_embed, self.num_pos_feats, self.temperature_h)
        pos_x = _sine_features(x_embed, self.num_pos_feats, self.temperature_w)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def anchor_sine_embedding(
    boxes: torch.Tensor, num_feats: int = 128, temperature: float = 10000.0
) -> torch.Tensor:
    """Sine embedding of anchor points or boxes (``gen_sineembed_for_position`` of the original).

    Args:
        boxes: [..., 2] (cx, cy) or [..., 4] (cx, cy, w, h), normalized to [0, 1].
        num_feats: features per coordinate.
        temperature: 10000 in the original code. The paper writes 20 for this embedding; the
            released checkpoints were trained with 10000, so we follow the code.

    Returns:
        [..., 2 * num_feats] or [..., 4 * num_feats] in the order (y, x[, w, h]): y comes first
        (the original's order, which the released weights depend on).
    """
    if boxes.shape[-1] not in (2, 4):
        raise ValueError(f"boxes must have 2 or 4 coordinates in the last dim, got {boxes.shape}")
    scaled = boxes * (2 * math.pi)
    order = [1, 0, 2, 3][: boxes.shape[-1]]  # (x, y, ...) -> (y, x, ...)
    # all coordinates in one pass: [..., n] -> [..., n, F] -> [..., n * F]
    return _sine_features(scaled[..., order], num_feats, temperature).flatten(-2)
