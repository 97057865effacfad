"""Budget configuration: YAML (or a dict) to frozen, validated policy objects."""

from payi_guard.config.parser import (
    MAX_AMOUNT,
    NANO_USD,
    PERIODS,
    STORAGE_SCHEMES,
    AnonymousPolicy,
    GuardConfig,
    LimitSpec,
    Period,
    PriceOverride,
    UnknownModelPolicy,
    check_file,
    config_fingerprint,
    describe,
    load_config,
    parse_config,
    redact_uri,
)

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
