"""The renaming engine shared by every source layout: apply a table of rules to a state dict,
account for every key, and check the result against the names and shapes our model has.

A rule is ``(regex, function)``: the first regex that matches a source key decides its fate. The
function receives the match and returns ``(our name, piece)``: ``piece`` is None for a whole
tensor, or ``(index, count)`` for one of ``count`` tensors concatenated along dim 0 (e.g. q, k, v
-> a packed ``in_proj``). A function raises ``KeyError`` for a key the layout cannot have. Keys
that a layout drops on purpose (e.g. BatchNorm's ``num_batches_tracked``) are dropped by a
separate rule that names the reason, never by silence.
"""
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .backbone_names import torchvision_to_d2_resnet_name
from .safe_load import CheckpointError

__all__ = ["Rule", "Renamed", "to", "torchvision_backbone", "qk_proj", "apply_rules", "check_against_model", "fmt"]

Rule = Tuple[str, Callable[[re.Match], Tuple[str, Optional[Tuple[int, int]]]]]


def to(template: str):
    """A rule function that renames by a ``re`` template (``\\1`` = the first group)."""
    return lambda m: (m.expand(template), None)


def torchvision_backbone(m: re.Match):
    """Group 1 is a torchvision ResNet name (``layer1.0.bn2.weight``) -> ``backbone.`` + Detectron2's."""
    new = torchvision_to_d2_resnet_name(m.group(1))  # KeyError for names a ResNet does not have
    if new is None:  # fc.* or num_batches_tracked: not part of a detector's backbone
        raise KeyError(m.group(0))
    return "backbone." + new, None


def qk_proj(prefix: str, which: str, kind: str) -> str:
    """('sa', 'query', 'content') -> 'sa_qcontent_proj' (the original's decoder projection names)."""
    return f"{prefix}_{which[0]}{kind}_proj"


def decoder_qk(prefix: str):
    """A rule target for a decoder query/key projection matched as (layer, query|key,
    content|pos, rest): -> ``transformer.decoder.layers.<layer>.<prefix>_<q|k><kind>_proj.<rest>``."""
    return lambda m: (f"transformer.decoder.layers.{m.group(1)}.{qk_proj(prefix, m.group(2), m.group(3))}.{m.group(4)}",
                      None)


@dataclass
class Renamed:
    """What ``apply_rules`` made of a state dict."""

    tensors: Dict[str, torch.Tensor]
    origin: Dict[str, str]  # our name -> source key(s)
    unmapped: List[str] = field(default_factory=list)  # source keys no rule placed
    problems: List[str] = field(default_factory=list)
    dropped: Dict[str, List[str]] = field(default_factory=dict)  # reason -> source keys


def apply_rules(state_dict: Dict[str, torch.Tensor], rules: Sequence[Tuple[re.Pattern, Callable]], *,
                drop: Optional[Callable[[str], Optional[str]]] = None,
                prepare: Optional[Callable[[str], str]] = None) -> Renamed:
    """Rename ``state_dict`` with compiled ``rules``.

    Args:
        drop: key -> the reason it is dropped, or None to keep it.
        prepare: rewrites a key before the rules see it (e.g. an older release's names).

    Two source keys that map to one name must hold equal tensors (one module saved twice) and are
    kept once; if they differ, that is a problem. Pieces are concatenated in index order.
    """
    out = Renamed({}, {})
    pieces: Dict[str, Dict[int, Tuple[str, torch.Tensor]]] = {}
    piece_count: Dict[str, int] = {}
    for key, value in state_dict.items():
        reason = drop(key) if drop else None
        if reason:
            out.dropped.setdefault(reason, []).append(key)
            continue
        name = prepare(key) if prepare else key
        new, piece = None, None
        for pattern, fn in rules:
            m = pattern.match(name)
            if m is None:
                continue
            try:
                new, piece = fn(m)
            except KeyError:
                new = None
            break
        if new is None:
            out.unmapped.append(key)
            continue
        if piece is not None:
            pieces.setdefault(new, {})[piece[0]] = (key, value)
            piece_count[new] = piece[1]
            continue
        if new in out.tensors:  # a second copy of one tensor: must be identical
            first = out.tensors[new]
            if first.shape != value.shape or not torch.equal(first, value):
                out.problems.append(f"{key} and {out.origin[new]} should be copies of one tensor ({new}) but differ")
            continue
        out.tensors[new] = value
        out.origin[new] = key
    for new, parts in pieces.items():
        count = piece_count[new]
        if sorted(parts) != list(range(count)):
            have = ", ".join(k for k, _ in parts.values())
            out.problems.append(f"{new} is assembled from {count} tensors, found only: {have}")
            continue
        out.tensors[new] = torch.cat([parts[i][1] for i in range(count)], dim=0)
        out.origin[new] = " + ".join(parts[i][0] for i in range(count))
    return out


def fmt(items, limit: int = 60) -> str:
    """A list for an error message: one item per indented line, at most ``limit`` shown."""
    items = list(items)
    shown = "\n    ".join(str(i) for i in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n    {shown}{more}"


def check_against_model(converted: Dict[str, torch.Tensor], expected: Dict[str, Tuple[int, ...]], what: str,
                        origin: Optional[Dict[str, str]] = None, unmapped: Sequence[str] = (),
                        problems: Sequence[str] = ()) -> None:
    """Raise one ``CheckpointError`` listing every converted key the model does not have, every
    key it needs that is missing, every shape mismatch, plus the given ``unmapped`` source keys and
    other ``problems``. ``origin`` maps a converted key to its source key, for the messages."""
    origin = origin or {}

    def name(k):
        return f"{origin[k]} -> {k}" if k in origin and origin[k] != k else k

    unmapped = list(unmapped) + [f"{name(k)} (our model does not have it)"
                                 for k in sorted(set(converted) - set(expected))]
    missing = sorted(set(expected) - set(converted))
    mismatched = [f"{name(k)}: checkpoint {tuple(converted[k].shape)}, model {expected[k]}"
                  for k in sorted(set(expected) & set(converted)) if tuple(converted[k].shape) != expected[k]]
    sections = [("unmapped key(s) (no counterpart in our model)", unmapped),
                ("missing key(s) (our model needs them)", missing),
                ("shape mismatch(es)", mismatched), ("other problem(s)", list(problems))]
    if any(items for _, items in sections):
        lines = [f"cannot convert {what}:"]
        lines += [f"  {len(items)} {title}:{fmt(items)}" for title, items in sections if items]
        raise CheckpointError("\n".join(lines))
