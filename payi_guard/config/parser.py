"""The budgets file's schema: a document tree validated into a :class:`GuardConfig`.

Money is held as integers in :data:`~payi_guard.money.NANO_USD` units (1e-9 USD) from
the moment it is parsed: ``max: 1.00`` becomes ``1_000_000_000``. YAML numbers are read
from their text and Python floats through ``Decimal(str(x))``, never through binary
arithmetic, so ``0.1`` is exactly 100_000_000; an amount finer than one nano-dollar is an
error, not a rounding. Requests and tokens are plain counts.

Every mistake fails fast with a :class:`~payi_guard.ConfigError` that names the file,
the 1-based line, the dotted key (``tiers.pro[1].max``) and what is wrong, with a
"did you mean" hint for near misses. Unknown keys and duplicate keys are errors.

Entry points: :func:`load_config` (a file), :func:`parse_config` (YAML text or a dict),
:func:`check_file` (``payi-guard check``). The values are read with the primitives of
:mod:`payi_guard.config.reader`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

from payi_guard.config.model import (
    STORAGE_SCHEMES,
    AnonymousPolicy,
    GuardConfig,
    LimitSpec,
    PriceOverride,
    UnknownModelPolicy,
)
from payi_guard.config.reader import NodeReader, first_line, kind_of, node_text, one_of, suggest
from payi_guard.config.yaml_tree import (
    Entry,
    Map,
    Node,
    Scalar,
    Seq,
    child_path,
    from_python,
    from_yaml,
    item_path,
)
from payi_guard.exceptions import InvalidUserId
from payi_guard.identity import is_anonymous_id, normalize_user_id
from payi_guard.usage import Unit
from payi_guard.windows import PERIODS, Period

__all__ = ["parse_config"]

_TOP_KEYS = (
    "version",
    "storage",
    "on_storage_error",
    "unknown_model",
    "prices",
    "limits",
    "default",
    "tiers",
    "users",
    "orgs",
    "global",
    "anonymous",
    "timezone",
    "reservation_ttl",
    "tier_cache_ttl",
    "analytics_days",
)
_UNITS: tuple[tuple[str, Unit], ...] = (
    ("max", "usd"),
    ("requests", "requests"),
    ("tokens", "tokens"),
)
_LIMIT_KEYS = ("max", "requests", "tokens", "per", "type", "warn_at", "timezone")
_PRICE_KEYS = ("input_per_mtok", "output_per_mtok", "cache_read_per_mtok", "cache_write_per_mtok")
_ANONYMOUS_KEYS = ("strategy", "limits")
_LIMIT_TYPES = ("block", "allow")
_STRATEGIES = ("reject", "shared", "session")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


class _Parser(NodeReader):
    """Validates a document tree into a :class:`GuardConfig`.

    Every check raises :class:`ConfigError` with the line of the offending key or value
    (when the tree came from YAML), its dotted path and what is wrong.
    """

    def __init__(self, source: str | None) -> None:
        super().__init__(source)
        self._timezone = "UTC"
        self._named: dict[str, LimitSpec] = {}
        self._tiers: dict[str, tuple[LimitSpec, ...]] = {}

    # -- sections --------------------------------------------------------------------

    def parse(self, root: Node | None) -> GuardConfig:
        if root is None:
            raise self._error(
                "the configuration is empty: give it some limits "
                "(default: [{max: 1.00, per: day}])",
                1,
                "",
            )
        if not isinstance(root, Map):
            hint = ""
            if isinstance(root, Scalar) and isinstance(root.value, str):
                hint = (
                    " (parse_config() reads YAML text; to read a file, "
                    "use Guard.from_yaml(path) or load_config(path))"
                )
            raise self._error(
                f"the top level must be a mapping of settings (version, storage, limits, ...), "
                f"not {kind_of(root)}{hint}",
                root.line,
                "",
            )
        top = self._fields(root, "", _TOP_KEYS, "top-level")
        get = top.get

        version = 1
        if (entry := get("version")) is not None:
            value = entry.value
            if not (isinstance(value, Scalar) and type(value.value) is int and value.value == 1):
                message = f"unsupported version {node_text(value)}; this payi_guard reads version 1"
                if isinstance(value, Scalar) and isinstance(value.value, str):
                    message = f"version is the number 1, not the text {value.value!r}"
                raise self._error(
                    message,
                    value.line,
                    "version",
                )
        if (entry := get("timezone")) is not None:
            self._timezone = self._zone(entry.value, "timezone")
        storage = "memory://"
        if (entry := get("storage")) is not None:
            storage = self._storage(entry.value, "storage")
        on_storage_error: Literal["block", "allow"] = "block"
        if (entry := get("on_storage_error")) is not None:
            on_storage_error = (
                "allow"
                if self._choice(entry.value, "on_storage_error", _LIMIT_TYPES, "value") == "allow"
                else "block"
            )
        unknown_model = UnknownModelPolicy()
        if (entry := get("unknown_model")) is not None:
            unknown_model = self._unknown_model(entry.value, "unknown_model", entry.line)
        prices = self._prices(get("prices"))
        self._named_limits(get("limits"))
        default: tuple[LimitSpec, ...] = ()
        if (entry := get("default")) is not None:
            default = self._limit_list(entry.value, "default", "user", nullable=True)
        self._tier_section(get("tiers"))
        users, user_tiers = self._users(get("users"))
        orgs = self._orgs(get("orgs"))
        global_limits: tuple[LimitSpec, ...] = ()
        if (entry := get("global")) is not None:
            global_limits = self._limit_list(entry.value, "global", "global", nullable=True)
        anonymous = AnonymousPolicy()
        if (entry := get("anonymous")) is not None:
            anonymous = self._anonymous(entry.value, "anonymous")
        reservation_ttl = 300.0
        if (entry := get("reservation_ttl")) is not None:
            reservation_ttl = self._ttl(entry.value, "reservation_ttl")
        tier_cache_ttl = 60.0
        if (entry := get("tier_cache_ttl")) is not None:
            tier_cache_ttl = self._seconds(entry.value, "tier_cache_ttl")
        analytics_days = 90
        if (entry := get("analytics_days")) is not None:
            days = self._decimal(entry.value, "analytics_days", "a whole number of days")
            if days != days.to_integral_value() or not 0 <= days <= 3660:
                raise self._error(
                    f"must be a whole number of days from 0 (off) to 3660, got "
                    f"{node_text(entry.value)}",
                    entry.value.line,
                    "analytics_days",
                )
            analytics_days = int(days)

        return GuardConfig(
            version=version,
            storage=storage,
            on_storage_error=on_storage_error,
            unknown_model=unknown_model,
            prices=MappingProxyType(prices),
            limits=MappingProxyType(dict(self._named)),
            default=default,
            tiers=MappingProxyType(dict(self._tiers)),
            users=MappingProxyType(users),
            user_tiers=MappingProxyType(user_tiers),
            orgs=MappingProxyType(orgs),
            global_limits=global_limits,
            anonymous=anonymous,
            timezone=self._timezone,
            reservation_ttl=reservation_ttl,
            tier_cache_ttl=tier_cache_ttl,
            analytics_days=analytics_days,
            source=self._source,
        )

    def _section(self, entry: Entry | None, path: str, example: str) -> tuple[Entry, ...]:
        """Return the entries of an optional top-level mapping (``null`` is empty)."""
        if entry is None or (isinstance(entry.value, Scalar) and entry.value.value is None):
            return ()
        return self._map(entry.value, path, "a mapping", example).entries

    def _storage(self, node: Node, path: str) -> str:
        uri = self._word(node, path, "a storage URI (memory:// or redis://host:6379/0)")
        match = _SCHEME.match(uri)
        if match is None:
            raise self._error(
                f"{uri!r} is not a storage URI; use memory://, sqlite:///budgets.db or "
                "redis://host:6379/0",
                node.line,
                path,
            )
        scheme = match.group(1).lower()
        if scheme not in STORAGE_SCHEMES:
            prefixes = [f"{known}://" for known in STORAGE_SCHEMES]
            hint = suggest(f"{scheme}://", prefixes) or f"; supported are {one_of(prefixes)}"
            raise self._error(
                f"unsupported storage scheme {scheme + '://'!r}{hint}", node.line, path
            )
        # Schemes are case-insensitive (RFC 3986): hand the ledger the lower-case form.
        uri = scheme + uri[match.end(1) :]
        if scheme == "memory" and uri[match.end() :] not in ("", "/"):
            raise self._error("memory storage takes no address: write memory://", node.line, path)
        if scheme == "sqlite":
            rest = uri[match.end() :]
            if not rest.startswith("/") or not rest.split("?", 1)[0].strip("/"):
                raise self._error(
                    "a sqlite store names a file: sqlite:///budgets.db (relative to this "
                    "file's folder) or sqlite:////abs/path.db",
                    node.line,
                    path,
                )
            return uri  # the ledger checks the rest (options, path) when it opens
        if not scheme.endswith(("+sentinel", "+cluster")):  # those list several hosts
            try:
                urlsplit(uri).port  # noqa: B018 - raises ValueError on a malformed port
            except ValueError as exc:
                raise self._error(f"invalid storage URI: {exc}", node.line, path) from None
        return uri

    def _price(self, node: Node, path: str, line: int | None) -> PriceOverride:
        mapping = self._map(
            node, path, "a price mapping", "{input_per_mtok: 1.0, output_per_mtok: 2.0}"
        )
        fields = self._fields(mapping, path, _PRICE_KEYS, "price")
        values: dict[str, Decimal] = {}
        for key in _PRICE_KEYS:
            entry = fields.get(key)
            if entry is None:
                if key in ("input_per_mtok", "output_per_mtok"):
                    raise self._error(
                        f"missing {key!r} (USD per million tokens)",
                        first_line(line, mapping.line),
                        path,
                    )
                continue
            key_path = child_path(path, key)
            price = self._decimal(entry.value, key_path, "a price in USD per million tokens")
            if price < 0:
                raise self._error(
                    f"a price cannot be negative, got {node_text(entry.value)}",
                    entry.value.line,
                    key_path,
                )
            values[key] = price
        return PriceOverride(
            input_per_mtok=values["input_per_mtok"],
            output_per_mtok=values["output_per_mtok"],
            cache_read_per_mtok=values.get("cache_read_per_mtok"),
            cache_write_per_mtok=values.get("cache_write_per_mtok"),
        )

    def _unknown_model(self, node: Node, path: str, line: int | None) -> UnknownModelPolicy:
        if isinstance(node, Map):
            return UnknownModelPolicy(action="price", price=self._price(node, path, line))
        if isinstance(node, Seq):
            raise self._error(
                "expected block, allow or a price mapping like "
                "{input_per_mtok: 10, output_per_mtok: 30}, got a list",
                node.line,
                path,
            )
        action = self._choice(node, path, ("block", "allow"), "unknown_model policy")
        return UnknownModelPolicy(action="allow" if action == "allow" else "block")

    def _prices(self, entry: Entry | None) -> dict[str, PriceOverride]:
        prices: dict[str, PriceOverride] = {}
        example = "{my-model: {input_per_mtok: 1.0, output_per_mtok: 2.0}}"
        for model in self._section(entry, "prices", example):
            path = child_path("prices", model.key)
            if not model.key or model.key != model.key.strip():
                raise self._error(
                    "a model name must be non-empty, without surrounding spaces",
                    model.line,
                    path,
                )
            prices[model.key] = self._price(model.value, path, model.line)
        return prices

    def _limit(self, node: Node, path: str, name: str, line: int | None) -> LimitSpec:
        mapping = self._map(node, path, "a limit", "{max: 1.00, per: day}")
        where = first_line(line, mapping.line)
        fields = self._fields(mapping, path, _LIMIT_KEYS, "limit")
        units = [(key, unit) for key, unit in _UNITS if key in fields]
        if not units:
            raise self._error(
                "a limit needs one of 'max' (USD), 'requests' or 'tokens'", where, path
            )
        if len(units) > 1:
            second = fields[units[1][0]]
            raise self._error(
                f"a limit counts one unit, but both {units[0][0]!r} and {units[1][0]!r} are "
                "given; split it into two limits",
                second.line,
                child_path(path, units[1][0]),
            )
        key, unit = units[0]
        amount_node = fields[key].value
        amount_path = child_path(path, key)
        amount = (
            self._usd(amount_node, amount_path)
            if unit == "usd"
            else self._count(amount_node, amount_path, key)
        )
        per_entry = fields.get("per")
        if per_entry is None:
            raise self._error(
                f"missing 'per' (one of {one_of(PERIODS)})", where, child_path(path, "per")
            )
        per = self._choice(per_entry.value, child_path(path, "per"), PERIODS, "period")
        limit_type: Literal["block", "allow"] = "block"
        if (entry := fields.get("type")) is not None:
            chosen = self._choice(entry.value, child_path(path, "type"), _LIMIT_TYPES, "type")
            limit_type = "allow" if chosen == "allow" else "block"
        warn_at: Fraction | None = None
        if (entry := fields.get("warn_at")) is not None:
            warn_at = self._warn_at(entry.value, child_path(path, "warn_at"))
        timezone = self._timezone
        if (entry := fields.get("timezone")) is not None:
            timezone = self._zone(entry.value, child_path(path, "timezone"))
        return LimitSpec(
            name=name,
            unit=unit,
            max=amount,
            per=_PERIOD_OF[per],
            type=limit_type,
            warn_at=warn_at,
            timezone=timezone,
            line=line,
        )

    def _warn_at(self, node: Node, path: str) -> Fraction:
        value = Fraction(self._decimal(node, path, "a fraction of max (like 0.8)"))
        if not 0 < value <= 1:
            raise self._error(
                f"warn_at is a fraction of max: more than 0 and at most 1 (0.8 warns at 80%), "
                f"got {node_text(node)}",
                node.line,
                path,
            )
        return value

    def _ttl(self, node: Node, path: str) -> float:
        seconds = self._decimal(node, path, "a number of seconds")
        if seconds <= 0:
            raise self._error(
                f"must be more than 0 seconds, got {node_text(node)}", node.line, path
            )
        return float(seconds)

    def _seconds(self, node: Node, path: str) -> float:
        seconds = self._decimal(node, path, "a number of seconds (0 asks every time)")
        if seconds < 0:
            raise self._error(f"must be 0 seconds or more, got {node_text(node)}", node.line, path)
        return float(seconds)

    def _named_limits(self, entry: Entry | None) -> None:
        for item in self._section(entry, "limits", "{daily: {max: 1.00, per: day}}"):
            path = child_path("limits", item.key)
            name = self._name(item.key, item.line, path, "limit")
            self._named[name] = self._limit(item.value, path, name, item.line)

    def _limit_list(
        self, node: Node, path: str, scope: str, *, nullable: bool = False
    ) -> tuple[LimitSpec, ...]:
        """Read a list of limits: inline mappings or names of limits under ``limits:``."""
        if nullable and isinstance(node, Scalar) and node.value is None:
            return ()
        if not isinstance(node, Seq):
            hint = "; wrap it in [ ]" if isinstance(node, Map) else ""
            if isinstance(node, Scalar) and isinstance(node.value, str):
                hint = f"; write [{node.value}] for a list of one named limit"
            raise self._error(
                f"expected a list of limits (names or mappings like {{max: 1.00, per: day}}), "
                f"got {kind_of(node)}{hint}",
                node.line,
                path,
            )
        specs: list[LimitSpec] = []
        seen: set[str] = set()
        for index, item in enumerate(node.items):
            item_at = item_path(path, index)
            if isinstance(item, Map):
                specs.append(self._limit(item, item_at, f"{scope}:{index}", item.line))
                continue
            name = self._word(item, item_at, "a limit name or a mapping like {max: 1.00, per: day}")
            spec = self._named.get(name)
            if spec is None:
                hint = suggest(name, self._named) or (
                    f"; named limits are: {one_of(list(self._named))}"
                    if self._named
                    else "; define it under 'limits:'"
                )
                raise self._error(f"unknown limit {name!r}{hint}", item.line, item_at)
            if name in seen:
                raise self._error(
                    f"limit {name!r} is listed twice (it would be charged twice)",
                    item.line,
                    item_at,
                )
            seen.add(name)
            specs.append(spec)
        return tuple(specs)

    def _tier_section(self, entry: Entry | None) -> None:
        for tier in self._section(entry, "tiers", "{pro: [{max: 10.00, per: day}]}"):
            path = child_path("tiers", tier.key)
            name = self._name(tier.key, tier.line, path, "tier")
            self._tiers[name] = self._limit_list(tier.value, path, "user")

    def _users(
        self, entry: Entry | None
    ) -> tuple[dict[str, tuple[LimitSpec, ...]], dict[str, str]]:
        users: dict[str, tuple[LimitSpec, ...]] = {}
        user_tiers: dict[str, str] = {}
        for user in self._section(entry, "users", "{alice: pro, bot: []}"):
            path = child_path("users", user.key)
            try:
                user_id = normalize_user_id(user.key)
            except InvalidUserId as exc:
                raise self._error(f"invalid user id: {exc.reason}", user.line, path) from None
            if is_anonymous_id(user_id):
                raise self._error(
                    f"{user_id!r} is the anonymous bucket, never a user: "
                    "its limits go under `anonymous: {limits: [...]}`",
                    user.line,
                    path,
                )
            value = user.value
            if isinstance(value, Seq):
                users[user_id] = self._limit_list(value, path, "user")
                continue
            what = "a tier name or a list of limits ([] for no limits of its own)"
            tier = self._word(value, path, what)
            if tier not in self._tiers:
                hint = suggest(tier, self._tiers)
                if not hint and tier in self._named:
                    hint = f"; {tier!r} is a named limit: write [{tier}] for a list of limits"
                elif not hint:
                    hint = (
                        f"; tiers are: {one_of(list(self._tiers))}"
                        if self._tiers
                        else "; define it under 'tiers:'"
                    )
                raise self._error(f"unknown tier {tier!r}{hint}", value.line, path)
            users[user_id] = self._tiers[tier]
            user_tiers[user_id] = tier
        return users, user_tiers

    def _orgs(self, entry: Entry | None) -> dict[str, tuple[LimitSpec, ...]]:
        orgs: dict[str, tuple[LimitSpec, ...]] = {}
        for org in self._section(entry, "orgs", "{acme: [{max: 100.00, per: month}]}"):
            path = child_path("orgs", org.key)
            try:
                org_id = normalize_user_id(org.key)
            except InvalidUserId as exc:
                raise self._error(f"invalid org id: {exc.reason}", org.line, path) from None
            if ":" in org_id:
                raise self._error(
                    "an org id is a single segment, without ':' (org 'acme' covers 'acme:alice')",
                    org.line,
                    path,
                )
            orgs[org_id] = self._limit_list(org.value, path, "org")
        return orgs

    def _anonymous(self, node: Node, path: str) -> AnonymousPolicy:
        if isinstance(node, Scalar):
            strategy = self._choice(node, path, _STRATEGIES, "anonymous strategy")
            return AnonymousPolicy(strategy=_STRATEGY_OF[strategy])
        mapping = self._map(
            node, path, "a strategy or a mapping", "{strategy: shared, limits: [...]}"
        )
        fields = self._fields(mapping, path, _ANONYMOUS_KEYS, "anonymous")
        strategy = "shared"
        if (entry := fields.get("strategy")) is not None:
            strategy = self._choice(
                entry.value, child_path(path, "strategy"), _STRATEGIES, "anonymous strategy"
            )
        limits: tuple[LimitSpec, ...] = ()
        if (entry := fields.get("limits")) is not None:
            limits = self._limit_list(
                entry.value, child_path(path, "limits"), "anonymous", nullable=True
            )
            if strategy == "reject" and limits:
                raise self._error(
                    "strategy 'reject' refuses every call without a user, so limits never "
                    "apply; remove them or use 'shared' or 'session'",
                    entry.line,
                    child_path(path, "limits"),
                )
        return AnonymousPolicy(strategy=_STRATEGY_OF[strategy], limits=limits)


_PERIOD_OF: Mapping[str, Period] = MappingProxyType({period: period for period in PERIODS})
_STRATEGY_OF: Mapping[str, Literal["reject", "shared", "session"]] = MappingProxyType(
    {"reject": "reject", "shared": "shared", "session": "session"}
)


def parse_config(data: Mapping[str, Any] | str, *, source: str | None = None) -> GuardConfig:
    """Validate a config given as a dict or as YAML text.

    A dict may hold ``int``, ``float``, ``Decimal`` or ``str`` numbers: floats are read
    through ``Decimal(str(x))``, so ``0.1`` is exactly 0.1 USD. YAML numbers are read from
    their text, never through a float.

    Args:
        data: the configuration as a mapping, or YAML text (the schema of DESIGN.md
            section 3).
        source: a name for the data (a file path), used in errors and kept as
            :attr:`GuardConfig.source`.

    Returns:
        The frozen, validated :class:`GuardConfig`.

    Raises:
        ConfigError: naming the line (for YAML text), the key and what is wrong.
        TypeError: ``data`` is neither a mapping nor a string.
    """
    if isinstance(data, str):
        root = from_yaml(data, source=source)
    elif isinstance(data, Mapping):
        root = from_python(data, source=source)
    else:
        raise TypeError(f"parse_config() takes a mapping or YAML text, not {type(data).__name__}")
    return _Parser(source).parse(root)
