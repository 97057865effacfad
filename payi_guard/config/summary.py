"""Summaries of a configuration for people and logs: fingerprint, description, safe URIs.

:func:`describe` is what ``payi-guard check`` prints; :func:`config_fingerprint` names a
policy in logs; :func:`redact_uri` is the one function that makes a storage URI safe to
show (log lines, ``repr``, the CLI).
"""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction

from payi_guard.config.model import GuardConfig, LimitSpec, PriceOverride, UnknownModelPolicy

__all__ = ["config_fingerprint", "describe", "redact_uri"]


def _canonical_price(price: PriceOverride | None) -> object:
    if price is None:
        return None
    return [
        None if amount is None else str(Fraction(amount))
        for amount in (
            price.input_per_mtok,
            price.output_per_mtok,
            price.cache_read_per_mtok,
            price.cache_write_per_mtok,
        )
    ]


def _canonical_limits(specs: tuple[LimitSpec, ...]) -> object:
    return [
        [
            spec.name,
            spec.unit,
            spec.max,
            spec.per,
            spec.type,
            None if spec.warn_at is None else str(spec.warn_at),
            spec.timezone,
        ]
        for spec in specs
    ]


def config_fingerprint(config: GuardConfig) -> str:
    """Return a short, stable hash of the effective policy (log it on every reload).

    Two configs that enforce the same thing have the same fingerprint, however they were
    written (key order, ``1.0`` or ``1.00``, a tier or its expanded list, comments); the
    source file name, line numbers and storage credentials are not part of it.

    Args:
        config: a validated configuration.

    Returns:
        16 hexadecimal characters (the start of a SHA-256 digest).
    """
    canonical = {
        "version": config.version,
        "storage": redact_uri(config.storage),
        "on_storage_error": config.on_storage_error,
        "unknown_model": [
            config.unknown_model.action,
            _canonical_price(config.unknown_model.price),
        ],
        "prices": {model: _canonical_price(price) for model, price in config.prices.items()},
        "limits": {name: _canonical_limits((spec,)) for name, spec in config.limits.items()},
        "default": _canonical_limits(config.default),
        "tiers": {name: _canonical_limits(specs) for name, specs in config.tiers.items()},
        "users": {user: _canonical_limits(specs) for user, specs in config.users.items()},
        "user_tiers": dict(config.user_tiers),
        "orgs": {org: _canonical_limits(specs) for org, specs in config.orgs.items()},
        "global": _canonical_limits(config.global_limits),
        "anonymous": [config.anonymous.strategy, _canonical_limits(config.anonymous.limits)],
        "timezone": config.timezone,
        "reservation_ttl": repr(config.reservation_ttl),
        "tier_cache_ttl": repr(config.tier_cache_ttl),
        "analytics_days": repr(config.analytics_days),
    }
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def redact_uri(uri: str) -> str:
    """Return ``uri`` safe to log or print: any credentials in it are replaced by ``***``.

    A password is masked and its user name kept (``rediss://alice:***@host/0``). A user
    name alone is masked whole (``redis://***@host``): some services hand out URIs whose
    user part is the access token. The credentials are whatever precedes the last ``@``
    before any query string, so a password holding ``/`` or ``@`` is masked too.

    Args:
        uri: a storage URI.

    Returns:
        The same URI with its credentials (if any) masked.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    end = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    credentials, at, location = rest[:end].rpartition("@")
    if not at or not credentials:
        return uri
    user, _, password = credentials.partition(":")
    if password:
        shown = f"{user}:***"
    elif user:
        shown = "***"
    else:
        return uri  # ``:@`` hides nothing
    return f"{scheme}://{shown}@{location}{rest[end:]}"


def _describe_unknown(policy: UnknownModelPolicy) -> str:
    price = policy.price
    if price is None:
        return policy.action
    return (
        f"{policy.action} (input {price.input_per_mtok}, output {price.output_per_mtok} "
        "USD per million tokens)"
    )


def _count_of(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count:,} {noun}s"


def describe(config: GuardConfig, *, verbose: bool = False) -> str:
    """Summarise a configuration (printed by ``payi-guard check`` on success).

    Args:
        config: a validated configuration.
        verbose: add lines for the default and anonymous limits, the unknown-model
            policy and the storage (its password masked).

    Returns:
        One line with the counts of named limits, tiers, users, orgs, global limits and
        price overrides and the :func:`config_fingerprint`; more lines when ``verbose``.
    """
    counts = ", ".join(
        (
            _count_of(len(config.limits), "named limit"),
            _count_of(len(config.tiers), "tier"),
            _count_of(len(config.users), "user"),
            _count_of(len(config.orgs), "org"),
            _count_of(len(config.global_limits), "global limit"),
            _count_of(len(config.prices), "price override"),
        )
    )
    summary = f"{counts}; fingerprint {config_fingerprint(config)}"
    if not verbose:
        return summary

    def names(specs: tuple[LimitSpec, ...]) -> str:
        return ", ".join(spec.name for spec in specs) if specs else "none"

    anonymous = config.anonymous
    detail = "" if anonymous.strategy == "reject" else f" ({names(anonymous.limits)})"
    return "\n".join(
        (
            summary,
            f"default limits: {names(config.default)}",
            f"anonymous: {anonymous.strategy}{detail}",
            f"unknown models: {_describe_unknown(config.unknown_model)}",
            f"storage: {redact_uri(config.storage)} (on error: {config.on_storage_error})",
        )
    )
