"""Checks of LazyConfigs before anything is built: unknown keys and arguments are named, with the
nearest existing ones.

- ``apply_checked_overrides(cfg, ["train.max_iter=10", ...])``: Detectron2's
  ``LazyConfig.apply_overrides``, except that a key that does not exist is an error naming it and
  suggesting the nearest existing keys (``difflib``). A new key is accepted in a ``LazyCall`` node
  only when its ``_target_`` takes that argument (e.g. ``dataloader.train.aspect_ratio_grouping``).
- ``check_config(cfg)``: every ``LazyCall`` node of the config (``model``, its parts, the data
  loaders, ...) is checked against the signature of its ``_target_``: an argument the callable does
  not take is an error naming the node, the class and its accepted arguments. In ``train`` (a plain
  dict read by the trainer), a key that is one typo away from a known key (``max_iterr``) is an
  error; other new keys are left alone (hooks added later may read them). ``train.precision``
  must name a precision (``dab_detr.precision``: fp32, bf16, fp16, auto).
- ``load_checked_config(path, overrides)``: both, for ``tools/lazyconfig_train_net.py``.

All errors are ``ConfigError`` (a ValueError); the tools print them without a traceback.
"""
import difflib
import inspect
from typing import Iterable, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig

from detectron2.config import LazyConfig
from detectron2.utils.registry import locate

from .precision import PrecisionError, parse_precision

__all__ = ["ConfigError", "TRAIN_KEYS", "apply_checked_overrides", "check_config", "load_checked_config"]

# keys of ``train`` that the trainer, Detectron2's default_setup and the hooks read
TRAIN_KEYS = ("output_dir", "init_checkpoint", "max_iter", "amp", "ddp", "checkpointer", "eval_period",
              "log_period", "device", "clip_grad", "grad_accumulation_steps", "model_ema", "seed",
              "cudnn_benchmark", "float32_precision", "precision")


class ConfigError(ValueError):
    """A config key or argument that does not exist (the message names it and what exists)."""


def _all_keys(node, prefix: str = "") -> List[str]:
    keys = []
    if isinstance(node, DictConfig):
        items = ((str(k), node._get_node(k)) for k in node.keys())
    elif isinstance(node, ListConfig):
        items = ((str(i), node._get_node(i)) for i in range(len(node)))
    else:
        return keys
    for key, child in items:
        if key == "_target_":
            continue
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(child, (DictConfig, ListConfig)):
            keys.extend(_all_keys(child, full + "."))
    return keys


def _suggest(word: str, choices: Iterable[str], n: int = 3) -> str:
    close = difflib.get_close_matches(word, list(dict.fromkeys(choices)), n=n, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _target(node: DictConfig):
    target = node.get("_target_")
    return locate(target) if isinstance(target, str) else target


def _target_name(target) -> str:
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)


def _accepted_arguments(target) -> Optional[List[str]]:
    """The keyword arguments ``target`` takes, or None when it takes any (``**kwargs``) or has no
    readable signature."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    params = signature.parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _unknown_argument_error(where: str, target, argument: str, accepted: List[str]) -> ConfigError:
    return ConfigError(
        f"{where}: {_target_name(target)} has no argument {argument!r}{_suggest(argument, accepted)}\n"
        f"  accepted arguments: {', '.join(accepted)}")


def _check_node(node, where: str, errors: List[str]) -> None:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            target = _target(node)
            accepted = _accepted_arguments(target)
            if accepted is not None:
                for key in node.keys():
                    if key != "_target_" and key not in accepted:
                        errors.append(str(_unknown_argument_error(f"{where}.{key}" if where else key,
                                                                  target, key, accepted)))
        for key in node.keys():
            if key != "_target_":
                child = node._get_node(key)
                if isinstance(child, (DictConfig, ListConfig)):
                    _check_node(child, f"{where}.{key}" if where else str(key), errors)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            child = node._get_node(i)
            if isinstance(child, (DictConfig, ListConfig)):
                _check_node(child, f"{where}[{i}]", errors)


def check_config(cfg: DictConfig) -> DictConfig:
    """Check every ``_target_`` node's arguments and the keys of ``train``; returns ``cfg``.
    Raises ConfigError listing every problem."""
    errors: List[str] = []
    _check_node(cfg, "", errors)
    train = cfg.get("train")
    if isinstance(train, DictConfig):
        for key in train.keys():
            if key not in TRAIN_KEYS and difflib.get_close_matches(key, TRAIN_KEYS, n=1, cutoff=0.8):
                errors.append(f"train.{key} is not a setting of the trainer{_suggest(key, TRAIN_KEYS)}")
        try:
            parse_precision(train.get("precision", "fp32"), "train.precision")
        except PrecisionError as e:
            errors.append(str(e))
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg


def _check_override_key(cfg: DictConfig, key: str) -> None:
    parts = key.split(".")
    node = cfg
    for depth, part in enumerate(parts):
        is_last = depth == len(parts) - 1
        if isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node._get_node(int(part))
            continue
        if isinstance(node, DictConfig) and part in node:
            node = node._get_node(part)
            continue
        where = ".".join(parts[:depth])
        if is_last and isinstance(node, DictConfig) and "_target_" in node:
            target = _target(node)
            accepted = _accepted_arguments(target)
            if accepted is None or part in accepted:
                return  # a new argument the callable takes
            raise _unknown_argument_error(key, target, part, accepted)
        existing = _all_keys(node, f"{where}." if where else "") if isinstance(node, (DictConfig, ListConfig)) else []
        nearest = _suggest(key, _all_keys(cfg) if not existing else existing + _all_keys(cfg))
        raise ConfigError(f"override {key!r}: the config has no key {part!r}"
                          f"{' under ' + repr(where) if where else ''}{nearest}")


def apply_checked_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """``LazyConfig.apply_overrides`` after checking that every overridden key exists (or is an
    argument of its node's ``_target_``). Returns the updated ``cfg``."""
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if "=" not in override or not key:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        _check_override_key(cfg, key)
    return LazyConfig.apply_overrides(cfg, list(overrides))


def load_checked_config(config_file: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Load ``config_file``, apply ``overrides`` with ``apply_checked_overrides``, then
    ``check_config``. Returns the config."""
    from .model_zoo import resolve_config_file  # model_zoo imports ConfigError from here

    cfg = LazyConfig.load(resolve_config_file(config_file))
    return check_config(apply_checked_overrides(cfg, overrides))
