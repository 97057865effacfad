"""Budget configuration: YAML (or a dict) to frozen, validated policy objects.

* :mod:`~payi_guard.config.model`: the frozen objects (:class:`GuardConfig`,
  :class:`LimitSpec`, ...);
* :mod:`~payi_guard.config.yaml_tree`: YAML text or a dict to a line-aware tree;
* :mod:`~payi_guard.config.reader` and :mod:`~payi_guard.config.parser`: the tree to a
  validated :class:`GuardConfig` (:func:`parse_config`), every error naming its file,
  line and key;
* :mod:`~payi_guard.config.loading`: a budgets file from disk (:func:`load_config`,
  :func:`check_file`), relative paths resolved against its folder;
* :mod:`~payi_guard.config.summary`: :func:`describe`, :func:`config_fingerprint` and
  :func:`redact_uri`, for the CLI and logs.
"""

from payi_guard.config.loading import check_file, load_config
from payi_guard.config.model import (
    MAX_AMOUNT,
    STORAGE_SCHEMES,
    AnonymousPolicy,
    GuardConfig,
    LimitSpec,
    PriceOverride,
    UnknownModelPolicy,
)
from payi_guard.config.parser import parse_config
from payi_guard.config.summary import config_fingerprint, describe, redact_uri
from payi_guard.money import NANO_USD
from payi_guard.windows import PERIODS, Period

__all__ = [
    "MAX_AMOUNT",
    "NANO_USD",
    "PERIODS",
    "STORAGE_SCHEMES",
    "AnonymousPolicy",
    "GuardConfig",
    "LimitSpec",
    "Period",
    "PriceOverride",
    "UnknownModelPolicy",
    "check_file",
    "config_fingerprint",
    "describe",
    "load_config",
    "parse_config",
    "redact_uri",
]
