"""Where the model-zoo configs live.

A wheel carries a copy of the repository's ``configs/`` inside the package
(``dab_detr/model_zoo/configs``, copied by ``setup.py`` at build time); a source checkout or an
editable install reads the repository's ``configs/`` directly, so there is one set of files to edit.
"""
import logging
import os
from typing import List

from ..config_checks import ConfigError
from ..user_errors import file_problem

logger = logging.getLogger(__name__)

_PACKAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_REPOSITORY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def configs_root() -> str:
    """The folder holding the model-zoo configs: the packaged copy in a wheel, else the repository's."""
    for root in (_PACKAGED, _REPOSITORY):
        if os.path.isfile(os.path.join(root, "common", "train.py")):
            return root
    raise ConfigError(f"this dab_detr installation has no model-zoo configs: neither {_PACKAGED} (a wheel's "
                      f"copy) nor {_REPOSITORY} (a source checkout) exists; reinstall dab-detr")


def _relative(config_path: str) -> str:
    path = config_path.replace(os.sep, "/")
    return path[len("configs/"):] if path.startswith("configs/") else path


def available_configs() -> List[str]:
    """The model-zoo config names (``dab_detr_r50.py`` ...), without the shared ``common/`` parts."""
    return sorted(f for f in os.listdir(configs_root()) if f.endswith(".py") and not f.startswith("_"))


def get_config_file(config_path: str) -> str:
    """The absolute path of a model-zoo config, named as ``dab_detr_r50.py`` or
    ``configs/dab_detr_r50.py``. Raises ``ConfigError`` listing the configs when there is none."""
    path = os.path.join(configs_root(), _relative(config_path))
    if not os.path.isfile(path):
        raise ConfigError(f"{config_path} is not a model-zoo config; the model zoo has: "
                          f"{', '.join(available_configs())}")
    return path


def resolve_config_file(config_file: str) -> str:
    """``config_file`` when it exists; else, when it names a model-zoo config (``configs/X.py`` as
    the documentation writes it, run from outside the repository), that config's path, logged.
    Raises ``ConfigError`` naming ``config_file`` and what is wrong with it when it is neither (it
    does not exist, is a folder, cannot be read)."""
    problem = file_problem(config_file)
    if problem is None:
        return config_file
    relative = _relative(config_file)
    if not os.path.exists(config_file) and not os.path.isabs(config_file) and \
            os.path.dirname(relative) in ("", "common", "common/models"):
        try:
            path = get_config_file(relative)
        except ConfigError:
            path = None
        if path is not None:
            logger.info("config %s is not in %s: using the model-zoo config %s", config_file, os.getcwd(), path)
            return path
    raise ConfigError(f"config file {config_file} {problem}")


def get_config(config_path: str):
    """The model-zoo LazyConfig ``config_path`` (see ``get_config_file``), loaded."""
    from detectron2.config import LazyConfig

    return LazyConfig.load(get_config_file(config_path))
