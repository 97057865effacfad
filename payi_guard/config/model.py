"""The budget policy as frozen, validated objects: what a budgets file becomes.

Money is held as integers in :data:`~payi_guard.money.NANO_USD` units (1e-9 USD) from the
moment it is parsed: ``max: 1.00`` becomes ``1_000_000_000``. Requests and tokens are
plain counts. :mod:`payi_guard.config.parser` builds these objects; nothing else does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Literal

from payi_guard.money import display_amount
from payi_guard.usage import Unit
from payi_guard.windows import Period

__all__ = [
    "MAX_AMOUNT",
    "STORAGE_SCHEMES",
    "AnonymousPolicy",
    "GuardConfig",
    "LimitSpec",
    "PriceOverride",
    "UnknownModelPolicy",
]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One limit: a maximum of one unit per calendar window.

    Attributes:
        name: the key under ``limits:`` for a named limit, else ``<scope>:<index>``
            where ``<index>`` is its position in its list and ``<scope>`` is ``user``
            (``default``, a tier or a user's own list), ``org``, ``global`` or
            ``anonymous`` (``user:0``, ``org:1``).
        unit: ``usd`` (``max:``), ``requests`` or ``tokens``.
        max: the maximum in ledger units: nano-USD for ``usd``, a count otherwise.
        per: the calendar window.
        type: ``block`` refuses calls that could cross ``max``; ``allow`` never refuses
            and logs ``budget_overrun`` instead.
        warn_at: fraction of ``max`` (0 < warn_at <= 1) where one ``budget_warning`` per
            window is logged, or ``None``.
        timezone: IANA zone the window is aligned to (``UTC`` unless set).
        line: the line of the YAML file that defined it, when loaded from a file.
    """

    name: str
    unit: Unit
    max: int
    per: Period
    type: Literal["block", "allow"] = "block"
    warn_at: Fraction | None = None
    timezone: str = "UTC"
    line: int | None = field(default=None, compare=False)

    @property
    def blocks(self) -> bool:
        """True for a hard (``type: block``) limit."""
        return self.type == "block"

    def max_display(self) -> Decimal | int:
        """``max`` in user units: ``Decimal`` dollars for money, ``int`` otherwise."""
        return display_amount(self.unit, self.max)


@dataclass(frozen=True, slots=True)
class PriceOverride:
    """A price set in the ``prices:`` section, in USD per million tokens.

    ``cache_read_per_mtok`` and ``cache_write_per_mtok`` default to the input price
    when ``None``.
    """

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cache_read_per_mtok: Decimal | None = None
    cache_write_per_mtok: Decimal | None = None


@dataclass(frozen=True, slots=True)
class UnknownModelPolicy:
    """What to do with a model no price is known for.

    Attributes:
        action: ``block`` refuses the call, ``allow`` sends it and charges the fallback
            ``price`` when one is set (else logs the call with ``cost_usd`` unknown-priced
            and ``outcome`` flagged; never silently $0), ``price`` charges ``price``.
        price: the fallback price, for ``action == "price"``.
    """

    action: Literal["block", "allow", "price"] = "block"
    price: PriceOverride | None = None


@dataclass(frozen=True, slots=True)
class AnonymousPolicy:
    """How calls with no known user are treated.

    Attributes:
        strategy: ``reject`` (refused; the middleware answers 401), ``shared`` (one
            anonymous bucket with ``limits``) or ``session`` (each session/device id the
            app provides is its own bucket with ``limits``).
        limits: the limits of the anonymous bucket(s).
    """

    strategy: Literal["reject", "shared", "session"] = "shared"
    limits: tuple[LimitSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """The whole, validated budget policy.

    Attributes:
        version: the schema version (1).
        storage: storage URI (``memory://``, ``redis://...``).
        on_storage_error: ``block`` (fail closed) or ``allow`` when storage fails.
        unknown_model: the unknown-model policy.
        prices: price overrides by model name.
        limits: the named, reusable limits.
        default: limits of any user not listed under ``users``.
        tiers: tier name -> limits.
        users: user id -> limits (tier names already expanded).
        user_tiers: user id -> tier name, for users assigned a tier.
        orgs: org id -> limits.
        global_limits: limits over all users together (the ``global:`` key).
        anonymous: the anonymous policy.
        timezone: the default IANA zone windows are aligned to.
        reservation_ttl: seconds after which an unsettled reservation is dropped.
        tier_cache_ttl: seconds a tier the app's ``tier_of`` function gave is reused
            (0: ask it for every call).
        analytics_days: days of usage analytics (per user and org, per day) the store
            keeps (0: none are written).
        source: the file the config was loaded from, if any.
    """

    version: int = 1
    storage: str = "memory://"
    on_storage_error: Literal["block", "allow"] = "block"
    unknown_model: UnknownModelPolicy = field(default_factory=UnknownModelPolicy)
    prices: Mapping[str, PriceOverride] = field(default_factory=lambda: _EMPTY)
    limits: Mapping[str, LimitSpec] = field(default_factory=lambda: _EMPTY)
    default: tuple[LimitSpec, ...] = ()
    tiers: Mapping[str, tuple[LimitSpec, ...]] = field(default_factory=lambda: _EMPTY)
    users: Mapping[str, tuple[LimitSpec, ...]] = field(default_factory=lambda: _EMPTY)
    user_tiers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    orgs: Mapping[str, tuple[LimitSpec, ...]] = field(default_factory=lambda: _EMPTY)
    global_limits: tuple[LimitSpec, ...] = ()
    anonymous: AnonymousPolicy = field(default_factory=AnonymousPolicy)
    timezone: str = "UTC"
    reservation_ttl: float = 300.0
    tier_cache_ttl: float = 60.0
    analytics_days: int = 90
    source: str | None = None


STORAGE_SCHEMES: tuple[str, ...] = (
    "memory",
    "sqlite",
    "redis",
    "rediss",
    "redis+unix",
    "redis+sentinel",
    "redis+cluster",
    "valkey",
    "valkeys",
    "valkey+unix",
    "valkey+sentinel",
    "valkey+cluster",
)
"""URI schemes accepted for ``storage:`` (``memory://``, ``sqlite://``, Redis or Valkey).

TLS for the sentinel and cluster forms is the ``?ssl=true`` option, not an ``s`` scheme.
"""

_MAX_EXPONENT = 40

MAX_AMOUNT = 2**53 - 1
"""Largest limit accepted, in ledger units: 2**53 - 1, the largest integer the Redis
ledger's Lua scripts compare exactly (about $9 million for money)."""
