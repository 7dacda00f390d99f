"""Deformable encoder and DAB decoder of DAB-Deformable-DETR (pure torch).

Follows the original code (SPEC-deformable section 2): post-norm layers, ReLU FFNs, no final
norms, dropout 0 by default, box refinement in every decoder layer with that layer's own box head.
Parameter names equal the original checkpoint's under ``transformer.``.
"""
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ...precision import run_in_fp32
from ..box_ops import inverse_sigmoid
from ..mlp import MLP
from ..position_encoding import anchor_sine_embedding
from .ms_deform_attn import MSDeformAttn, _as_shape_list


def valid_ratios_of(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, h, w] bool (True = padding) -> [B, 2] valid fraction in the order (w, h).

    Counted like the original: non-padded entries of column 0 (height) and of row 0 (width).
    """
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float()
    valid_w = (~mask[:, 0, :]).sum(1).float()
    return torch.stack([valid_w / w, valid_h / h], -1)


def encoder_reference_points(spatial_shapes: torch.Tensor, valid_ratios: torch.Tensor) -> torch.Tensor:
    """Reference points of the encoder tokens.

    Args:
        spatial_shapes: [L, 2] tensor or list of (h_l, w_l).
        valid_ratios: [B, L, 2] (w, h) valid fractions.

    Returns:
        [B, S, L, 2] (x, y): the pixel centre of each token, normalized to the valid region of its
        own level, then multiplied by each target level's valid ratio. This double scaling is the
        original's (inherited from Deformable DETR, its issue #36) and is kept for parity.
    """
    points = []
    for level, (h, w) in enumerate(_as_shape_list(spatial_shapes)):
        ys = torch.arange(h, dtype=torch.float32, device=valid_ratios.device) + 0.5
        xs = torch.arange(w, dtype=torch.float32, device=valid_ratios.device) + 0.5
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
        ref_y = ref_y.reshape(1, -1) / (valid_ratios[:, None, level, 1] * h)
        ref_x = ref_x.reshape(1, -1) / (valid_ratios[:, None, level, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention, add & norm1, FFN (ReLU), add & norm2."""

    def __init__(self, d_model=256, d_ffn=2048, dropout=0.0, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, padding_mask):
        """src, pos: [B, S, C]; reference_points: [B, S, L, 2]; padding_mask: [B, S] -> [B, S, C]."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableEncoder(nn.Module):
    def __init__(self, num_layers=6, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    def forward(self, src, pos, spatial_shapes, valid_ratios, padding_mask):
        """src, pos: [B, S, C]; valid_ratios: [B, L, 2]; padding_mask: [B, S] -> memory [B, S, C]."""
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, padding_mask)
        return src


class DABDeformableDecoderLayer(nn.Module):
    """Post-norm layer: self-attention, add & norm2; deformable cross-attention on 4-D anchors,
    add & norm1; FFN (ReLU), add & norm3.

    The LayerNorm names follow the original checkpoint (norm2 after self-attention, norm1 after
    cross-attention), not the call order.
    """

    def __init__(self, d_model=256, d_ffn=2048, dropout=0.0, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        # registration order as in the original, so state dicts list keys in the same order
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_boxes, memory, spatial_shapes, memory_padding_mask,
                self_attn_mask: Optional[torch.Tensor] = None):
        """
        Args:
            tgt, query_pos: [B, Q, C] content and positional queries.
            reference_boxes: [B, Q, L, 4] anchors (cx, cy, w, h) scaled to each level's padded map.
            memory: [B, S, C]; memory_padding_mask: [B, S] True on padding.
            self_attn_mask: [Q, Q] bool, True where a query may not attend to another (query
                denoising, ``dab_detr.modeling.denoising``); None: no mask.

        Returns:
            [B, Q, C].
        """
        q = k = tgt + query_pos
        self_attn = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(self_attn))
        cross = self.cross_attn(tgt + query_pos, reference_boxes, memory, spatial_shapes, memory_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(cross))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class DABDeformableDecoder(nn.Module):
    """DAB decoder with deformable cross-attention and per-layer box refinement.

    Args:
        num_layers: decoder layers (6).
        d_model: hidden size (256).
        layer0_broadcast_bug: reproduce the layer-0 bug of the original code before commit
            9d6f645 (needed only by the "v1" 48.1 AP checkpoint; SPEC-deformable section 6.1): in
            layer 0 the unbatched anchors [Q, 4] were broadcast against the valid ratios
            [B, 1, L, 4], so anchor coordinate l acted as level l (x for level 0, y for level 1,
            w for 2, h for 3) and the positional query encoded (x, x, x, x). Needs 4 levels.
        layer_kwargs: forwarded to :class:`DABDeformableDecoderLayer`.
    """

    def __init__(self, num_layers=6, d_model=256, layer0_broadcast_bug=False, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(
            DABDeformableDecoderLayer(d_model=d_model, **layer_kwargs) for _ in range(num_layers)
        )
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.d_model = d_model
        self.layer0_broadcast_bug = layer0_broadcast_bug
        if layer0_broadcast_bug and layer_kwargs.get("n_levels", 4) != 4:
            raise ValueError("layer0_broadcast_bug reproduces a broadcast that only exists with 4 feature levels")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(
        self,
        tgt: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        valid_ratios: torch.Tensor,
        memory_padding_mask: torch.Tensor,
        bbox_embed: Sequence[nn.Module],
        self_attn_mask: Optional[torch.Tensor] = None,
    ):
        """
        Args:
            tgt: [B, Q, C] content queries.
            reference_boxes: [B, Q, 4] initial anchors (cx, cy, w, h) in [0, 1] (after sigmoid).
            memory: [B, S, C] encoder output; memory_padding_mask: [B, S].
            spatial_shapes: [L, 2]; valid_ratios: [B, L, 2] (w, h).
            bbox_embed: one box head per layer (box deltas in logit space).
            self_attn_mask: [Q, Q] bool mask of every layer's self-attention (query denoising).

        Returns:
            hs [N, B, Q, C] (each layer's output), boxes [N, B, Q, 4]: each layer's refined boxes
            ``sigmoid(bbox_embed[k](hs[k]) + inverse_sigmoid(reference_k))``. These are the
            predicted boxes of the heads; the next layer gets them detached.
        """
        if len(bbox_embed) < self.num_layers:
            raise ValueError(f"need one box head per decoder layer ({self.num_layers}), got {len(bbox_embed)}")
        valid_ratios_4 = torch.cat([valid_ratios, valid_ratios], -1)  # [B, L, 4] (w, h, w, h)
        out = tgt
        hs, boxes = [], []
        for k, layer in enumerate(self.layers):
            if k == 0 and self.layer0_broadcast_bug:
                # [B, Q, 4, 1] * [B, 1, L, 4]: anchor coordinate l is used as level l (bug of v1)
                boxes_per_level = reference_boxes[:, :, :, None] * valid_ratios_4[:, None]
            else:
                boxes_per_level = reference_boxes[:, :, None] * valid_ratios_4[:, None]  # [B, Q, L, 4]
            # the positional query comes from the level-0 scaled box, as in the original
            raw_query_pos = self.ref_point_head(anchor_sine_embedding(boxes_per_level[:, :, 0], self.d_model // 2))
            query_pos = raw_query_pos if k == 0 else self.query_scale(out) * raw_query_pos
            out = layer(out, query_pos, boxes_per_level, memory, spatial_shapes, memory_padding_mask, self_attn_mask)
            # the box heads in fp32 under autocast: bf16 deltas moved the boxes (precision.py)
            new_boxes = (run_in_fp32(bbox_embed[k], out) + inverse_sigmoid(reference_boxes)).sigmoid()
            hs.append(out)
            boxes.append(new_boxes)
            reference_boxes = new_boxes.detach()
        return torch.stack(hs), torch.stack(boxes)


class DABDeformableTransformer(nn.Module):
    """Multi-scale deformable encoder + DAB deformable decoder, with optional two-stage proposals.

    Args:
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout: sizes
            (256, 8, 6, 6, 2048, 0.0 in the original).
        num_feature_levels: L (4).
        enc_n_points, dec_n_points: sampling points per head and level (4, 4).
        two_stage: build queries from encoder proposals as detrex does (see :meth:`forward`);
            adds ``enc_output`` and ``enc_output_norm``.
        two_stage_num_proposals: number of proposals kept (the number of queries, 300).
        layer0_broadcast_bug: see :class:`DABDeformableDecoder` (off by default).
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        two_stage: bool = False,
        two_stage_num_proposals: int = 300,
        layer0_broadcast_bug: bool = False,
    ):
        super().__init__()
        if two_stage and layer0_broadcast_bug:
            raise ValueError("layer0_broadcast_bug applies to learned (unbatched) anchors only, not to two_stage")
        self.d_model = d_model
        self.num_feature_levels = num_feature_levels
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        common = dict(d_ffn=dim_feedforward, dropout=dropout, n_levels=num_feature_levels, n_heads=nhead)
        self.encoder = DeformableEncoder(
            num_encoder_layers, d_model=d_model, n_points=enc_n_points, **common
        )
        self.decoder = DABDeformableDecoder(
            num_decoder_layers, d_model=d_model, layer0_broadcast_bug=layer0_broadcast_bug,
            n_points=dec_n_points, **common,
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
        self.reset_parameters()

    def reset_parameters(self):
        """Xavier-uniform on every matrix, then the deformable attentions' own init, then
        level_embed ~ N(0, 1) (SPEC-deformable section 3)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def _flatten(self, srcs, masks, pos_embeds):
        if not (len(srcs) == len(masks) == len(pos_embeds) == self.num_feature_levels):
            raise ValueError(
                f"expected {self.num_feature_levels} feature levels, got {len(srcs)} features, "
                f"{len(masks)} masks and {len(pos_embeds)} position embeddings"
            )
        shapes = [tuple(src.shape[-2:]) for src in srcs]
        src_flatten = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        mask_flatten = torch.cat([m.flatten(1) for m in masks], 1)
        pos_flatten = torch.cat(
            [pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1) for lvl, pos in enumerate(pos_embeds)],
            1,
        )
        # (h, w) pairs as a list, not a tensor: no host-device sync per layer, and the sizes stay
        # symbolic under torch.export (a tensor's values would become data-dependent)
        spatial_shapes = shapes
        valid_ratios = torch.stack([valid_ratios_of(m) for m in masks], 1)
        return src_flatten, mask_flatten, pos_flatten, spatial_shapes, valid_ratios

    def encoder_proposals(self, memory, memory_padding_mask, spatial_shapes):
        """Proposals of the two-stage variant (Deformable DETR's rule, as in detrex).

        One box per encoder token: its pixel centre normalized by the valid size of its level,
        width and height 0.05 * 2^level. Returns (output_memory [B, S, C]: memory with padded and
        out-of-range tokens zeroed, then ``enc_output`` and ``enc_output_norm``;
        proposals [B, S, 4] in logit space, +inf where invalid).
        """
        batch = memory.shape[0]
        proposals, start = [], 0
        for level, (h, w) in enumerate(_as_shape_list(spatial_shapes)):
            mask = memory_padding_mask[:, start : start + h * w].view(batch, h, w)
            valid_h = (~mask[:, :, 0]).sum(1)
            valid_w = (~mask[:, 0, :]).sum(1)
            grid_y, grid_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=memory.device),
                torch.arange(w, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.stack([grid_x, grid_y], -1)  # [h, w, 2]
            scale = torch.stack([valid_w, valid_h], -1).view(batch, 1, 1, 2)
            grid = (grid[None] + 0.5) / scale
            wh = torch.full_like(grid, 0.05 * (2.0**level))
            proposals.append(torch.cat((grid, wh), -1).view(batch, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(memory_padding_mask[..., None], float("inf"))
        proposals = proposals.masked_fill(~valid, float("inf"))
        output_memory = memory.masked_fill(memory_padding_mask[..., None], 0.0).masked_fill(~valid, 0.0)
        return self.enc_output_norm(self.enc_output(output_memory)), proposals

    def forward(
        self,
        srcs: List[torch.Tensor],
        masks: List[torch.Tensor],
        pos_embeds: List[torch.Tensor],
        bbox_embed: Sequence[nn.Module],
        query_content: Optional[torch.Tensor] = None,
        query_anchors: Optional[torch.Tensor] = None,
        proposal_class_embed: Optional[nn.Module] = None,
        proposal_bbox_embed: Optional[nn.Module] = None,
        self_attn_mask: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            srcs: L feature maps [B, C, h_l, w_l] (finest first); masks: L [B, h_l, w_l] bool
                (True = padding); pos_embeds: L [B, C, h_l, w_l] image position embeddings.
            bbox_embed: one box head per decoder layer.
            query_content: [Q, C] learned content queries (one-stage), or [B, Q, C] per image
                (with query denoising's noised queries in front).
            query_anchors: [Q, 4] learned anchors in logit space (cx, cy, w, h) (one-stage), or
                [B, Q, 4] per image.
            proposal_class_embed, proposal_bbox_embed: heads that score and refine the encoder
                proposals (two-stage).
            self_attn_mask: [Q, Q] bool mask of the decoder self-attention (query denoising).

        Returns:
            dict with ``hs`` [N, B, Q, C], ``boxes`` [N, B, Q, 4] (each decoder layer's predicted
            boxes, normalized cx, cy, w, h), ``init_reference`` [B, Q, 4]; for two-stage also
            ``enc_memory`` [B, Q, C] (the selected proposal features, not detached) and
            ``enc_boxes`` [B, Q, 4] (the selected proposal boxes, not detached).
        """
        src_flatten, mask_flatten, pos_flatten, spatial_shapes, valid_ratios = self._flatten(srcs, masks, pos_embeds)
        memory = self.encoder(src_flatten, pos_flatten, spatial_shapes, valid_ratios, mask_flatten)
        batch = memory.shape[0]
        extra = {}
        if self.two_stage:
            if proposal_class_embed is None or proposal_bbox_embed is None:
                raise ValueError("two_stage needs proposal_class_embed and proposal_bbox_embed")
            # detrex's two-stage: proposals scored by the max class logit; the content queries are
            # the (detached) transformed memory at the top-k proposals
            if memory.shape[1] < self.two_stage_num_proposals:
                raise ValueError(
                    f"two-stage needs at least two_stage_num_proposals={self.two_stage_num_proposals} "
                    f"encoder tokens, but the images give only {memory.shape[1]} (feature sizes "
                    f"{_as_shape_list(spatial_shapes)}); use larger images or fewer proposals"
                )
            output_memory, proposals = self.encoder_proposals(memory, mask_flatten, spatial_shapes)
            # scored and refined in fp32 under autocast: bf16 scores would tie in the top-k
            scores = run_in_fp32(proposal_class_embed, output_memory).max(-1)[0]
            coords_logit = run_in_fp32(proposal_bbox_embed, output_memory) + proposals
            topk = torch.topk(scores, self.two_stage_num_proposals, dim=1)[1]
            topk_coords_logit = torch.gather(coords_logit, 1, topk[..., None].expand(-1, -1, 4))
            reference_boxes = topk_coords_logit.detach().sigmoid()
            enc_memory = torch.gather(output_memory, 1, topk[..., None].expand(-1, -1, output_memory.shape[-1]))
            tgt = enc_memory.detach()
            extra = {"enc_memory": enc_memory, "enc_boxes": topk_coords_logit.sigmoid()}
        else:
            if query_content is None or query_anchors is None:
                raise ValueError("the one-stage transformer needs query_content and query_anchors")
            tgt = query_content.expand(batch, -1, -1)  # [Q, C] or [B, Q, C]
            reference_boxes = query_anchors.sigmoid().expand(batch, -1, -1)
        hs, boxes = self.decoder(
            tgt, reference_boxes, memory, spatial_shapes, valid_ratios, mask_flatten, bbox_embed, self_attn_mask
        )
        return {"hs": hs, "boxes": boxes, "init_reference": reference_boxes, **extra}
