"""What one source layout (a publisher's checkpoint format) declares; the converter does the rest."""
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from ..rename import Rule
from ..safe_load import CheckpointError

__all__ = ["SourceLayout", "weights_under_model"]


def weights_under_model(obj: Any, path: str) -> Tuple[Dict, Dict]:
    """The usual file: ``{"model": state_dict, ...}`` (Detectron2, detrex) or a bare state dict;
    a ``{"state_dict": ...}`` file (mmengine, Lightning) is read too, so that its keys can tell
    the user which ``--source`` it is."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    for entry in ("model", "state_dict"):
        if isinstance(obj.get(entry), dict):
            return obj[entry], {}
    return obj, {}


@dataclass(frozen=True)
class SourceLayout:
    """A checkpoint layout of DAB-DETR published by someone else.

    Attributes:
        name: the ``--source`` value.
        description: who publishes it (for ``--help``).
        rules: the renaming table (see ``rename``), first match wins.
        looks_like: state-dict keys -> True if they are of this layout (used to tell the user
            which ``--source`` a file really is).
        read: (loaded file, path) -> (state dict, settings saved beside the weights); the settings
            are ``Variant`` fields (``dilation``, ``pe_temperature``, ``random_refpoints_xy``).
        settings_from_keys: settings the key names reveal (e.g. detrex's DC5 backbone wrapper).
        drop: key -> the reason this layout drops it on purpose, or None.
        prepare: rewrites a key before the rules see it (an older release's names).
        config_family: which config family evaluates it ("" = the original's configs, or a
            dedicated config such as ``configs/dab_detr_r50_mmdet.py``).
        example_prefixes: key prefixes that show the layout in messages.
    """

    name: str
    description: str
    rules: Sequence[Rule]
    looks_like: Callable[[Sequence[str]], bool]
    read: Callable[[Any, str], Tuple[Dict, Dict]] = weights_under_model
    settings_from_keys: Callable[[Sequence[str]], Dict] = lambda keys: {}
    drop: Optional[Callable[[str], Optional[str]]] = None
    prepare: Optional[Callable[[str], str]] = None
    config_family: str = ""
    example_prefixes: Tuple[str, ...] = ()
    compiled: Tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "compiled", tuple((re.compile(p), f) for p, f in self.rules))
