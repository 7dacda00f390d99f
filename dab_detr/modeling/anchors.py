"""Learned anchor boxes (the decoder queries of DAB-DETR)."""
import torch
from torch import nn

from .box_ops import inverse_sigmoid


class AnchorBoxes(nn.Module):
    """``num_queries`` learned anchors in logit space (cx, cy, w, h); the state-dict key is ``weight``.

    Args:
        num_queries: number of anchors.
        random_xy: initialize the centres uniformly in the image, ``inverse_sigmoid(U(0, 1))``
            (the "fixxy" variant of the paper), instead of N(0, 1) for all four numbers. As in
            the original code, this alone does NOT freeze the centres: the original's freeze set
            ``requires_grad`` on a temporary slice, a no-op, and the released fixxy checkpoint was
            trained that way.
        freeze_xy: really keep the centres fixed: they are stored as a buffer and get no
            gradient and no weight decay; only (w, h) are trained. The state dict still holds
            one ``weight`` [Q, 4], so checkpoints load either way.
    """

    def __init__(self, num_queries: int, random_xy: bool = False, freeze_xy: bool = False):
        super().__init__()
        init = torch.randn(num_queries, 4)  # nn.Embedding's N(0, 1)
        if random_xy:
            init[:, :2] = inverse_sigmoid(torch.rand(num_queries, 2))
        self.freeze_xy = freeze_xy
        if freeze_xy:
            self.register_buffer("xy", init[:, :2].clone(), persistent=False)
            self.wh = nn.Parameter(init[:, 2:].clone())
        else:
            self.weight = nn.Parameter(init)

    def forward(self) -> torch.Tensor:
        """-> [Q, 4] anchors in logit space."""
        if self.freeze_xy:
            return torch.cat((self.xy, self.wh), dim=1)
        return self.weight

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.freeze_xy:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = self()
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if not self.freeze_xy:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                                 missing_keys, unexpected_keys, error_msgs)
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        weight = state_dict[key]
        if weight.shape != (self.wh.shape[0], 4):
            error_msgs.append(f"size mismatch for {key}: checkpoint {tuple(weight.shape)}, "
                              f"model {(self.wh.shape[0], 4)}")
            return
        with torch.no_grad():
            self.xy.copy_(weight[:, :2])
            self.wh.copy_(weight[:, 2:])
