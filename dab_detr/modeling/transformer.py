"""The DAB-DETR transformer: a conditional encoder and the dynamic-anchor-box decoder.

All tensors are batch-first: sequences are [B, L, d]. Module and parameter names follow the
original code so that its checkpoints map one-to-one (see ``dab_detr.checkpoint``).
"""
from typing import Callable, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..precision import run_in_fp32
from .box_ops import inverse_sigmoid
from .mlp import MLP
from .position_encoding import anchor_sine_embedding


def _activation(name: str) -> nn.Module:
    if name == "prelu":
        return nn.PReLU()  # one learnable slope per layer, init 0.25 (the original's default)
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown transformer activation {name!r}; expected 'prelu' or 'relu'")


class ProjectedAttention(nn.Module):
    """Multi-head attention over already projected queries, keys and values, plus the output projection.

    The DAB decoder projects queries and keys itself (content and position separately), so this
    module only splits heads, attends and projects the output. Query/key and value head widths may
    differ: the cross-attention concatenates content and position per head (64-wide heads for
    queries and keys, 32-wide for values), so the softmax scale is 64 ** -0.5 there.
    """

    def __init__(self, value_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.out_proj = nn.Linear(value_dim, value_dim)

    def forward(self, query, key, value, key_padding_mask: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None):
        """query [B, Lq, Dqk], key [B, Lk, Dqk], value [B, Lk, Dv] -> [B, Lq, Dv].

        key_padding_mask: [B, Lk] and attn_mask: [Lq, Lk] (query denoising), bool, True = ignore.
        """
        batch = query.shape[0]

        def split_heads(x):
            return x.view(batch, x.shape[1], self.num_heads, -1).transpose(1, 2)

        q, k, v = split_heads(query), split_heads(key), split_heads(value)
        dropout = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.shape[-1] != v.shape[-1] and not torch.jit.is_tracing():
            # PyTorch's fused CPU kernel needs equal query and value head widths; for the
            # cross-attention's 64/32 heads SDPA falls back to a generic path that spends most of
            # its time on copies and on masking checks (DAB-DETR-R50 inference: 12 -> 8 ms per
            # layer written out, same values to ~1e-7). jit tracing (fvcore's FLOP count, export
            # by tracing) records the standard operator.
            logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
            if key_padding_mask is not None:
                logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            if attn_mask is not None:
                logits = logits.masked_fill(attn_mask, float("-inf"))
            out = F.dropout(logits.softmax(dim=-1), dropout, self.training) @ v
        else:
            allowed = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
            if attn_mask is not None:
                allowed = ~attn_mask if allowed is None else allowed & ~attn_mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class EncoderLayer(nn.Module):
    """Post-norm encoder layer: self-attention with positions on queries and keys, then FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation: str):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.activation = _activation(activation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src, pos, key_padding_mask):
        """src, pos: [B, HW, d]; key_padding_mask: [B, HW] -> [B, HW, d]."""
        q = k = src + pos
        attn = self.self_attn(q, k, src, key_padding_mask=key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout(attn))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


class DABEncoder(nn.Module):
    """Six post-norm layers; before each one the image positions are scaled by ``query_scale(src)``.

    There is no final norm (post-norm, as the original).
    """

    def __init__(self, d_model, nhead, num_layers, dim_feedforward, dropout, activation):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, nhead, dim_feedforward, dropout, activation) for _ in range(num_layers)
        )
        self.query_scale = MLP(d_model, d_model, d_model, 2)

    def forward(self, src, pos, key_padding_mask):
        """src, pos: [B, HW, d]; key_padding_mask: [B, HW] (True = padding) -> memory [B, HW, d]."""
        for layer in self.layers:
            src = layer(src, pos * self.query_scale(src), key_padding_mask)
        return src


class DecoderLayer(nn.Module):
    """One DAB decoder layer, written out in the order of the original code (SPEC section 4).

    Self-attention projects content and position separately and adds them; cross-attention
    concatenates content and (modulated) position per head, so each head attends with 2x wider
    queries and keys. Only a layer with ``use_query_pos_in_cross_attn`` (layer 0 unless
    ``keep_query_pos``) owns ``ca_qpos_proj`` and adds positions to the cross-attention content.
    """

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation: str,
        use_query_pos_in_cross_attn: bool,
    ):
        super().__init__()
        self.nhead = nhead
        # self-attention
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn = ProjectedAttention(d_model, nhead, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        # cross-attention
        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_proj = nn.Linear(d_model, d_model) if use_query_pos_in_cross_attn else None
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.cross_attn = ProjectedAttention(d_model, nhead, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        # feed-forward
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.activation = _activation(activation)
        self.dropout = nn.Dropout(dropout)

    def _concat_heads(self, content, position):
        """[B, L, d] x2 -> [B, L, 2d]: per head, the content head followed by the position head."""
        batch, length, _ = content.shape
        return torch.cat(
            (content.view(batch, length, self.nhead, -1), position.view(batch, length, self.nhead, -1)), dim=3
        ).flatten(2)

    def forward(self, tgt, memory, memory_padding_mask, image_pos, query_pos, query_sine_embed,
                self_attn_mask: Optional[torch.Tensor] = None):
        """
        Args:
            tgt: [B, Q, d] content queries.
            memory: [B, HW, d] encoder output; memory_padding_mask: [B, HW] (True = padding).
            image_pos: [B, HW, d] image position embedding.
            query_pos: [B, Q, d] positional queries (``ref_point_head`` of the anchor embedding).
            query_sine_embed: [B, Q, d] scaled, width/height-modulated (y, x) anchor sine features.
            self_attn_mask: [Q, Q] bool, True where a query may not attend to another (query
                denoising); None: every query sees every query.

        Returns:
            [B, Q, d] updated content queries (not normalized by the decoder's shared norm).
        """
        # 1. self-attention among queries
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        v = self.sa_v_proj(tgt)
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, k, v, attn_mask=self_attn_mask)))

        # 2. cross-attention to the image, in fp32 under bf16/fp16 autocast: the query-key dot
        # products locate the anchors, and their rounding moved boxes 4x more (precision.py)
        tgt = run_in_fp32(self._cross_attention, tgt, memory, memory_padding_mask, image_pos, query_pos,
                          query_sine_embed)

        # 3. feed-forward
        ffn = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout(ffn))

    def _cross_attention(self, tgt, memory, memory_padding_mask, image_pos, query_pos, query_sine_embed):
        """Cross-attention to the image, content and position concatenated per head, with the
        residual and norm2 (shapes as ``forward``) -> [B, Q, d]."""
        q_content = self.ca_qcontent_proj(tgt)
        k_content = self.ca_kcontent_proj(memory)
        v = self.ca_v_proj(memory)
        k_pos = self.ca_kpos_proj(image_pos)
        if self.ca_qpos_proj is not None:
            q_content = q_content + self.ca_qpos_proj(query_pos)
            k_content = k_content + k_pos
        q = self._concat_heads(q_content, self.ca_qpos_sine_proj(query_sine_embed))
        k = self._concat_heads(k_content, k_pos)
        return self.norm2(tgt + self.dropout(self.cross_attn(q, k, v, memory_padding_mask)))


class DABDecoder(nn.Module):
    """The decoder that refines 4-D anchor boxes layer by layer.

    Args:
        modulate_hw_attn: scale the x/y halves of the positional query by (predicted w / anchor w)
            and (predicted h / anchor h), the width/height-modulated attention of the paper.
        keep_query_pos: let every layer (not only layer 0) add the positional query to the
            cross-attention content (``ca_qpos_proj``).
        anchor_update_eps: clamp of ``inverse_sigmoid`` in the anchor update between layers:
            1e-3 as the original; MMDetection's DAB-DETR uses 1e-5 (``configs/dab_detr_r50_mmdet.py``).
    """

    def __init__(self, d_model, nhead, num_layers, dim_feedforward, dropout, activation,
                 modulate_hw_attn: bool = True, keep_query_pos: bool = False, anchor_update_eps: float = 1e-3):
        super().__init__()
        self.d_model = d_model
        self.anchor_update_eps = anchor_update_eps
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                         use_query_pos_in_cross_attn=(i == 0 or keep_query_pos))
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)  # shared by every layer's output
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2) if modulate_hw_attn else None

    def forward(
        self, tgt, memory, memory_padding_mask, image_pos, anchors,
        bbox_embed: Callable[[torch.Tensor], torch.Tensor], self_attn_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            tgt: [B, Q, d] initial content queries (zeros, or pattern embeddings; with query
                denoising, label embeddings).
            memory, image_pos: [B, HW, d]; memory_padding_mask: [B, HW].
            anchors: [B, Q, 4] initial anchors, normalized (cx, cy, w, h) (sigmoid of the learned ones).
            bbox_embed: the box head shared with the detector; predicts the anchor update from
                the un-normalized layer output.
            self_attn_mask: [Q, Q] bool for every layer's self-attention (``DecoderLayer``).

        Returns:
            hidden: [num_layers, B, Q, d] every layer's output after the shared norm.
            references: [num_layers, B, Q, 4] the anchor each layer's box prediction is relative
                to: the initial anchors, then each layer's update. These are NOT detached (the
                original's behaviour): layer l+1's box loss reaches layer l's update. Only the
                anchors fed to the next layer's attention are detached.
        """
        output = tgt
        reference = anchors
        references, hidden = [anchors], []
        for layer_id, layer in enumerate(self.layers):
            sine = anchor_sine_embedding(reference, num_feats=self.d_model // 2)  # [B, Q, 2d]: (y, x, w, h)
            query_pos = self.ref_point_head(sine)
            # conditional spatial query: layer 0 uses the anchor embedding unscaled
            query_sine_embed = sine[..., : self.d_model]
            if layer_id > 0:
                query_sine_embed = query_sine_embed * self.query_scale(output)
            if self.ref_anchor_head is not None:
                ref_wh = self.ref_anchor_head(output).sigmoid()
                half = self.d_model // 2
                # y half scaled by h_ref / h, x half by w_ref / w (applied to the sine features
                # before projection, as the original code; the paper writes it on the dot product)
                query_sine_embed = torch.cat((
                    query_sine_embed[..., :half] * (ref_wh[..., 1] / reference[..., 3]).unsqueeze(-1),
                    query_sine_embed[..., half:] * (ref_wh[..., 0] / reference[..., 2]).unsqueeze(-1),
                ), dim=-1)

            output = layer(output, memory, memory_padding_mask, image_pos, query_pos, query_sine_embed, self_attn_mask)

            # anchor update from the un-normalized output (the original's choice)
            new_reference = (run_in_fp32(bbox_embed, output)
                             + inverse_sigmoid(reference, eps=self.anchor_update_eps)).sigmoid()
            if layer_id < len(self.layers) - 1:
                references.append(new_reference)
            reference = new_reference.detach()
            hidden.append(self.norm(output))
        return torch.stack(hidden), torch.stack(references)


class DABTransformer(nn.Module):
    """Encoder and DAB decoder with the original's defaults (SPEC sections 1, 3, 4).

    Args:
        d_model: hidden size (256). nhead: attention heads (8).
        num_encoder_layers, num_decoder_layers: 6 and 6.
        dim_feedforward: FFN width (2048). dropout: 0.0 in the original 50-epoch recipe.
        activation: "prelu" (the original's default for DAB-DETR) or "relu".
        num_patterns: 0, or the number of pattern embeddings; with P patterns the decoder runs
            P x num_queries queries whose content is the pattern embedding (pattern-major order).
        modulate_hw_attn, keep_query_pos, anchor_update_eps: see ``DABDecoder``.
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        activation: str = "prelu",
        num_patterns: int = 0,
        modulate_hw_attn: bool = True,
        keep_query_pos: bool = False,
        anchor_update_eps: float = 1e-3,
    ):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        if num_patterns < 0:
            raise ValueError(f"num_patterns must be >= 0, got {num_patterns}")
        self.d_model = d_model
        self.num_patterns = num_patterns
        self.encoder = DABEncoder(d_model, nhead, num_encoder_layers, dim_feedforward, dropout, activation)
        self.decoder = DABDecoder(d_model, nhead, num_decoder_layers, dim_feedforward, dropout, activation,
                                  modulate_hw_attn=modulate_hw_attn, keep_query_pos=keep_query_pos,
                                  anchor_update_eps=anchor_update_eps)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # created after the xavier init, so it keeps nn.Embedding's N(0, 1) (as the original)
        self.patterns = nn.Embedding(num_patterns, d_model) if num_patterns > 0 else None

    def forward(self, src, padding_mask, image_pos, anchors_logit, bbox_embed, matching_content=None,
                denoising=None):
        """
        Args:
            src: [B, d, H, W] projected backbone features.
            padding_mask: [B, H, W] bool, True on padding; None: no padding (attention unmasked).
            image_pos: [B, d, H, W] image position embedding.
            anchors_logit: [Q, 4] learned anchors in logit space (cx, cy, w, h).
            bbox_embed: the shared box head.
            matching_content: [d] content added to every query's pattern embedding (or used
                alone without patterns); None: zeros (DAB-DETR). DN-DETR: the "unknown" label
                embedding (``denoising.matching_content``).
            denoising: ``DenoisingQueries`` placed in front of the matching queries, whose
                ``attn_mask`` masks the decoder self-attention; None: none.

        Returns:
            hidden [L, B, P + Q', d] and references [L, B, P + Q', 4], Q' = Q * max(1, num_patterns)
            and P the denoising queries (0 without).
        """
        batch = src.shape[0]
        src = src.flatten(2).transpose(1, 2)
        image_pos = image_pos.flatten(2).transpose(1, 2)
        if padding_mask is not None:
            padding_mask = padding_mask.flatten(1)
        memory = self.encoder(src, image_pos, padding_mask)

        num_queries = anchors_logit.shape[0]
        if self.patterns is None:
            tgt = src.new_zeros(batch, num_queries, self.d_model)
        else:
            # pattern-major: query p * Q + q has pattern p and anchor q
            tgt = self.patterns.weight.repeat_interleave(num_queries, dim=0)
            tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
            anchors_logit = anchors_logit.repeat(self.num_patterns, 1)
        if matching_content is not None:
            tgt = matching_content.to(tgt.dtype) + tgt  # DN-DETR: label embedding + pattern
        anchors = anchors_logit.sigmoid().unsqueeze(0).expand(batch, -1, -1)
        if denoising is None:
            return self.decoder(tgt, memory, padding_mask, image_pos, anchors, bbox_embed)
        tgt = torch.cat([denoising.content.to(tgt.dtype), tgt], dim=1)
        anchors = torch.cat([denoising.anchors_logit.sigmoid().to(anchors.dtype), anchors], dim=1)
        return self.decoder(tgt, memory, padding_mask, image_pos, anchors, bbox_embed, denoising.attn_mask)
