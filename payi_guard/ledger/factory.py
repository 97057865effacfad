"""Ledgers from storage URIs (the ``storage:`` setting of a budgets file).

==========================================================  =============================
URI                                                         ledger
==========================================================  =============================
``memory://``                                               :class:`MemoryLedger`
``sqlite:///relative.db``, ``sqlite:////absolute.db``       :class:`SqliteLedger` (one
                                                            file shared by the processes
                                                            of one host; see
                                                            ``ledger.sqlite``)
``redis://[[user]:[password]@]host[:port][/db]``            redis-py client (``from_url``)
``rediss://…``                                              the same over TLS
``redis+unix:///path/to/redis.sock[?db=0]``                 a Unix socket
``valkey://…``, ``valkeys://…``, ``valkey+unix://…``        Valkey speaks the Redis
                                                            protocol: same as ``redis``
``redis+sentinel://[[user]:[password]@]h1[:p1][,h2[:p2]]``  ``Sentinel(...).master_for``
``/service_name[/db]``                                      (sentinel port 26379)
``redis+cluster://[[user]:[password]@]h1[:p1][,h2[:p2]]``   ``RedisCluster`` (grouped by
                                                            slot, see ``ledger.redis``)
==========================================================  =============================

``valkey+sentinel://`` and ``valkey+cluster://`` are accepted as well. Query options of
the ``redis``/``valkey`` forms are passed to redis-py (``?socket_timeout=1``); the
sentinel and cluster forms accept ``socket_timeout``, ``socket_connect_timeout``,
``ssl`` and, for sentinel, ``sentinel_password``. Keyword options are passed to the
client constructor, except the ledger's own: ``group_by_slot``, ``closed_ttl``,
``on_event`` (a callback taking each :class:`~payi_guard.ledger.StorageEvent`) and
``marker_key`` (the key of the store marker, ``payi_guard:store-marker``).

Timeouts: unless the URI or the options say otherwise, clients get a 0.25 s connect and
read timeout and no automatic retry, so a dead server fails a call within a fraction of
a second instead of hanging it (``on_storage_error`` then decides). Every operation of a
``redis://`` or Sentinel ledger waits on the store at most twice the socket timeout in
total (a free connection, connecting, the handshake, the reply); a Sentinel lookup of
the master and a Redis Cluster's own redirections may add to that.

Pools: the ``redis://`` forms use a blocking pool of up to 1000 connections (opened on
demand), so hundreds of concurrent calls never wait for one; beyond that a call waits
for a free connection up to the socket timeout. ``max_connections`` and ``timeout``
(the pool wait) change that. An asyncio Redis Cluster client opens up to 1000
connections per node too (redis-py's own default is 100, past which a command fails);
it does not wait for one. Ledgers opened with the same URI and options in one
process share one client (the async ones, one per event loop), so several Guards on one
store share its connections; the last ledger to close closes it.

Restarts: the ``redis://`` and Sentinel forms check the store marker on every new
connection, which is how a restart without persistence is noticed (see
:class:`~payi_guard.ledger.StorageEvent`); Redis Cluster connections do not (a node's
slots would need a marker each), nor do they bound the total wait or tell an unknown
outcome from a failure (every timeout is reported as an unknown outcome).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote

from payi_guard.exceptions import ConfigError, StorageError
from payi_guard.ledger.base import DEFAULT_CLOSED_TTL, AsyncLedger, Ledger
from payi_guard.ledger.memory import AsyncMemoryLedger, MemoryLedger

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_POOL_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "open_async_ledger",
    "open_ledger",
    "resolve_storage_uri",
]

DEFAULT_TIMEOUT = 0.25
"""Seconds allowed to connect to, and to hear back from, a storage server."""

DEFAULT_POOL_TIMEOUT = 1.0
"""Seconds an SQLite ledger waits for the file's write lock by default (Redis pools wait
for a free connection no longer than their socket timeout)."""

DEFAULT_MAX_CONNECTIONS = 1000
"""Connections a ``redis://`` pool may open (on demand) per process, or per event loop."""

_LEDGER_OPTIONS = ("group_by_slot", "closed_ttl", "on_event", "marker_key")

_URL_SCHEMES = {
    "redis": "redis",
    "rediss": "rediss",
    "redis+unix": "unix",
    "valkey": "redis",
    "valkeys": "rediss",
    "valkey+unix": "unix",
}
_SENTINEL_SCHEMES = ("redis+sentinel", "valkey+sentinel")
_CLUSTER_SCHEMES = ("redis+cluster", "valkey+cluster")
_SUPPORTED = (
    "memory://, sqlite:///, redis://, rediss://, redis+unix://, valkey://, redis+sentinel://, "
    "redis+cluster://"
)
_FLOAT_OPTIONS = ("socket_timeout", "socket_connect_timeout")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class _Target:
    """A parsed storage URI."""

    kind: Literal["memory", "url", "sentinel", "cluster"]
    url: str = ""
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    query: dict[str, Any] = field(default_factory=dict)


def _scheme_of(uri: str) -> tuple[str, str]:
    if not isinstance(uri, str):
        raise ConfigError(f"storage must be a URI string, got {type(uri).__name__}")
    scheme, sep, rest = uri.partition("://")
    if not sep or not scheme:
        raise ConfigError(f"storage must be a URI such as {_SUPPORTED}")
    return scheme.lower(), rest


def _parse_hosts(netloc: str, default_port: int, scheme: str) -> tuple[tuple[str, int], ...]:
    hosts: list[tuple[str, int]] = []
    for part in netloc.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):
            host, _, tail = part[1:].partition("]")
            port_text = tail[1:] if tail.startswith(":") else ""
        else:
            host, _, port_text = part.partition(":")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise ConfigError(f"{scheme}:// has an invalid port {port_text!r}") from None
        if not host or not 0 < port < 65536:
            raise ConfigError(f"{scheme}:// has an invalid host entry")
        hosts.append((host, port))
    if not hosts:
        raise ConfigError(f"{scheme}:// needs at least one host")
    return tuple(hosts)


def _parse_query(query: str, scheme: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in allowed:
            raise ConfigError(
                f"{scheme}:// does not accept the option {name!r} (accepted: {', '.join(allowed)})"
            )
        if name in _FLOAT_OPTIONS:
            try:
                out[name] = float(value)
            except ValueError:
                raise ConfigError(f"{scheme}:// option {name} must be a number") from None
        elif name == "ssl":
            if value.lower() not in _TRUE + _FALSE:
                raise ConfigError(f"{scheme}:// option ssl must be true or false")
            out[name] = value.lower() in _TRUE
        else:
            out[name] = value
    return out


def _parse_multi_host(scheme: str, rest: str) -> _Target:
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon else None
        if not colon:  # "redis+sentinel://secret@host" means a password, as redis-py reads it
            username, password = None, unquote(user_text) or None
    if scheme in _SENTINEL_SCHEMES:
        hosts = _parse_hosts(hostlist, 26379, scheme)
        service, _, db_text = path.partition("/")
        service = unquote(service)
        if not service:
            raise ConfigError(f"{scheme}:// needs the service name as its path: /mymaster")
        try:
            db = int(db_text.strip("/") or 0)
        except ValueError:
            raise ConfigError(f"{scheme}:// has an invalid db {db_text!r}") from None
        options = _parse_query(query, scheme, (*_FLOAT_OPTIONS, "ssl", "sentinel_password"))
        return _Target("sentinel", hosts=hosts, service=service, db=db, username=username,
                       password=password, query=options)  # fmt: skip
    hosts = _parse_hosts(hostlist, 6379, scheme)
    if path.strip("/") not in ("", "0"):
        raise ConfigError(f"{scheme}:// cannot select a database: Redis Cluster only has db 0")
    options = _parse_query(query, scheme, (*_FLOAT_OPTIONS, "ssl"))
    return _Target("cluster", hosts=hosts, username=username, password=password, query=options)


def _parse(uri: str) -> _Target:
    scheme, rest = _scheme_of(uri)
    if scheme == "memory":
        if rest.strip("/"):
            raise ConfigError("memory:// takes no host, path or options")
        return _Target("memory")
    if scheme in _URL_SCHEMES:
        return _Target("url", url=f"{_URL_SCHEMES[scheme]}://{rest}")
    if scheme in _SENTINEL_SCHEMES or scheme in _CLUSTER_SCHEMES:
        return _parse_multi_host(scheme, rest)
    raise ConfigError(f"unsupported storage scheme {scheme!r}: use one of {_SUPPORTED}")


def _client_options(target: _Target, options: dict[str, Any], retry: Any) -> dict[str, Any]:
    """Defaults < URI query < keyword options (redis-py's ``from_url`` lets its query win)."""
    merged: dict[str, Any] = {
        "socket_timeout": DEFAULT_TIMEOUT,
        "socket_connect_timeout": DEFAULT_TIMEOUT,
        "retry": retry,
    }
    merged.update(target.query)
    merged.update(options)
    if target.username is not None:
        merged.setdefault("username", target.username)
    if target.password is not None:
        merged.setdefault("password", target.password)
    return merged


_MODULES = {
    "sync": ("redis", "redis.retry", "redis.sentinel", "redis.cluster"),
    "async": (
        "redis.asyncio",
        "redis.asyncio.retry",
        "redis.asyncio.sentinel",
        "redis.asyncio.cluster",
    ),
}


def _make_client(target: _Target, options: dict[str, Any], flavour: str, watch: Any) -> Any:
    """Build the sync or async redis-py client a target names (no I/O but for a cluster)."""
    from payi_guard.ledger import _redis_pool, _redisconn

    client_mod, retry_mod, sentinel_mod, cluster_mod = (
        importlib.import_module(name) for name in _MODULES[flavour]
    )
    backoff = importlib.import_module("redis.backoff")
    kwargs = _client_options(target, options, retry_mod.Retry(backoff.NoBackoff(), 0))
    wrap = (
        _redisconn.sync_connection_class if flavour == "sync" else _redisconn.async_connection_class
    )
    if target.kind == "url":
        # Enough connections that a burst never waits for one; past that, a call waits
        # for a free one no longer than for a reply (the URI's timeout wins, as in
        # redis-py's from_url).
        in_uri = importlib.import_module("redis.connection").parse_url(target.url)
        kwargs.setdefault("max_connections", DEFAULT_MAX_CONNECTIONS)
        kwargs.setdefault("timeout", in_uri.get("socket_timeout", kwargs.get("socket_timeout")))
        pool_class = client_mod.BlockingConnectionPool
        if flavour == "async":
            pool_class = _redis_pool.lean_pool_class(pool_class)
        else:
            pool_class = _redis_pool.lean_sync_pool_class(pool_class)
        pool = pool_class.from_url(target.url, **kwargs)
        pool.connection_class = wrap(pool.connection_class, watch)
        return client_mod.Redis.from_pool(pool)
    if target.kind == "sentinel":
        sentinel_kwargs = {
            name: kwargs[name] for name in ("socket_timeout", "socket_connect_timeout", "retry")
        }
        sentinel_password = kwargs.pop("sentinel_password", None)
        if sentinel_password is not None:
            sentinel_kwargs["password"] = sentinel_password
        sentinel = sentinel_mod.Sentinel(
            list(target.hosts), sentinel_kwargs=sentinel_kwargs, **kwargs
        )
        client = sentinel.master_for(target.service, db=target.db)
        pool = client.connection_pool
        pool.connection_class = wrap(pool.connection_class, watch)
        return client
    if flavour == "async":
        # redis-py's async cluster client opens at most 100 connections per node by
        # default and fails a command past that (MaxConnectionsError, a connection
        # error, on which it drops every connection to that node): a burst of a few
        # hundred calls would fail calls that a healthy store could serve.
        kwargs.setdefault("max_connections", DEFAULT_MAX_CONNECTIONS)
    nodes = [cluster_mod.ClusterNode(host, port) for host, port in target.hosts]
    return cluster_mod.RedisCluster(startup_nodes=nodes, **kwargs)


def _sync_client(target: _Target, options: dict[str, Any], watch: Any) -> Any:
    redis = importlib.import_module("redis")
    try:
        # A sync RedisCluster learns the slot map while it is built, so it is the one
        # client that talks to the server here.
        return _make_client(target, options, "sync", watch)
    except (redis.RedisError, redis.exceptions.RedisClusterException, OSError) as exc:
        raise StorageError(f"cannot reach the Redis storage: {exc}") from exc


def _hashable(value: Any) -> Hashable:
    try:
        hash(value)
    except TypeError:
        return ("object", id(value))
    return value  # type: ignore[no-any-return]


def _share_key(flavour: str, uri: str, options: dict[str, Any]) -> Hashable:
    """Ledgers with equal keys share one client (per process, or per event loop)."""
    return (flavour, uri, tuple(sorted((name, _hashable(v)) for name, v in options.items())))


def _drop_store_options(options: dict[str, Any]) -> None:
    # Memory and SQLite stores have no marker to watch: the data of the one lives as long
    # as its process, the other's is a file that a restart does not empty.
    options.pop("on_event", None)
    options.pop("marker_key", None)


def _ledger_options(options: dict[str, Any]) -> dict[str, Any]:
    return {name: options.pop(name) for name in _LEDGER_OPTIONS if name in options}


def _wiring_for(target: _Target, uri: str, own: dict[str, Any]) -> Any:
    """The wiring of the ledgers a target gets (its watch, whether errors are tagged)."""
    from payi_guard.ledger import _redisconn
    from payi_guard.ledger._redis_plans import _Wiring

    redis = importlib.import_module("redis")
    ambiguous = (redis.ConnectionError, redis.TimeoutError, OSError)
    if target.kind == "cluster":
        return _Wiring(None, None, False, None, ambiguous)
    store = (target.kind, target.url or uri)
    watch = _redisconn.store_watch(store, own.get("marker_key") or _redisconn.DEFAULT_MARKER_KEY)
    return _Wiring(watch, None, True, None, ambiguous)


def open_ledger(
    uri: str, *, base_dir: str | os.PathLike[str] | None = None, **options: Any
) -> Ledger:
    """Open a synchronous ledger from a storage URI.

    Args:
        uri: ``memory://``, ``sqlite:///…`` or a Redis-family URI (see the module
            documentation).
        base_dir: the folder a relative ``sqlite:///`` path is relative to (the budgets
            file's folder); the current directory when omitted. Other schemes ignore it.
        **options: for ``memory://``, :class:`MemoryLedger` arguments (``on_event`` and
            ``marker_key`` are accepted and unused: an in-process store cannot lose its
            data while its process lives); for ``sqlite://``,
            :class:`~payi_guard.ledger.sqlite.SqliteLedger` arguments; otherwise the
            ledger's own options (``group_by_slot``, ``closed_ttl``, ``on_event``,
            ``marker_key``) and anything else for the
            redis-py client (``socket_timeout=1.0``, ``max_connections=50``, ...).

    Returns:
        A :class:`MemoryLedger`, :class:`~payi_guard.ledger.sqlite.SqliteLedger` or
        :class:`~payi_guard.ledger.redis.RedisLedger`.

    Raises:
        ConfigError: when the URI is malformed or its scheme is not supported.
        MissingDependency: for a Redis URI when redis-py is not installed.
        StorageError: when an SQLite file cannot be opened, or a Redis Cluster cannot be
            reached to learn its slots.
    """
    if _is_sqlite(uri):
        from payi_guard.ledger.sqlite import open_sqlite_ledger

        _drop_store_options(options)
        return open_sqlite_ledger(uri, base_dir=base_dir, **options)
    target = _parse(uri)
    if target.kind == "memory":
        _drop_store_options(options)
        return MemoryLedger(**options)
    from payi_guard.ledger import _redisconn
    from payi_guard.ledger.redis import RedisLedger, import_redis

    import_redis()
    own = _ledger_options(options)
    wiring = _wiring_for(target, uri, own)
    client, release = _redisconn.shared_sync_client(
        _share_key("sync", uri, {**options, "marker_key": own.get("marker_key")}),
        lambda: _sync_client(target, dict(options), wiring.watch),
    )
    try:
        ledger = RedisLedger(
            client,
            group_by_slot=own.get("group_by_slot"),
            closed_ttl=own.get("closed_ttl", DEFAULT_CLOSED_TTL),
            on_event=own.get("on_event"),
        )
    except BaseException:
        release()
        raise
    ledger._attach(wiring, release)
    return ledger


def open_async_ledger(
    uri: str,
    *,
    shared: MemoryLedger | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    **options: Any,
) -> AsyncLedger:
    """Open an async ledger from a storage URI.

    Args:
        uri: ``memory://``, ``sqlite:///…`` or a Redis-family URI (see the module
            documentation).
        shared: for ``memory://``, the :class:`MemoryLedger` whose counters the async
            ledger must share (a Guard's sync and async paths charge one store); a new
            store when omitted. With ``shared``, memory options are ignored (they were
            given when ``shared`` was made).
        base_dir: as for :func:`open_ledger`.
        **options: as for :func:`open_ledger` (``sqlite://`` also takes ``workers``, the
            size of its thread pool). Redis clients are made lazily, one per running
            event loop (shared by the ledgers of that loop opened with the same URI and
            options), and an SQLite file is opened by the first operation, so nothing
            connects here.

    Returns:
        An :class:`AsyncMemoryLedger`,
        :class:`~payi_guard.ledger.sqlite.AsyncSqliteLedger` or
        :class:`~payi_guard.ledger.redis.AsyncRedisLedger`.

    Raises:
        ConfigError: when the URI is malformed, its scheme is not supported, or
            ``shared`` is given for a non-memory URI.
        MissingDependency: for a Redis URI when redis-py is not installed.
    """
    if _is_sqlite(uri):
        if shared is not None:
            raise ConfigError("shared applies to memory:// only")
        from payi_guard.ledger.sqlite import open_async_sqlite_ledger

        _drop_store_options(options)
        return open_async_sqlite_ledger(uri, base_dir=base_dir, **options)
    target = _parse(uri)
    if target.kind == "memory":
        if shared is not None:
            # The options were applied when ``shared`` was made; they are not reapplied.
            if not isinstance(shared, MemoryLedger):
                raise ConfigError(f"shared must be a MemoryLedger, got {type(shared).__name__}")
            return AsyncMemoryLedger(shared)
        _drop_store_options(options)
        return AsyncMemoryLedger(MemoryLedger(**options))
    if shared is not None:
        raise ConfigError("shared applies to memory:// only")
    from payi_guard.ledger import _redisconn
    from payi_guard.ledger.redis import AsyncRedisLedger, import_redis

    import_redis()
    own = _ledger_options(options)
    wiring = _wiring_for(target, uri, own)
    key = _share_key("async", uri, {**options, "marker_key": own.get("marker_key")})

    def make() -> Any:
        return _make_client(target, dict(options), "async", wiring.watch)

    def lease() -> tuple[Any, Callable[[], Any]]:
        return _redisconn.shared_async_client(key, make)

    ledger = AsyncRedisLedger(
        make,
        group_by_slot=own.get("group_by_slot"),
        closed_ttl=own.get("closed_ttl", DEFAULT_CLOSED_TTL),
        on_event=own.get("on_event"),
    )
    ledger._attach(wiring, lease)
    return ledger


# -- sqlite:// (the parsing lives in ledger.sqlite) ---------------------------------------


def _is_sqlite(uri: object) -> bool:
    return isinstance(uri, str) and uri[:9].lower() == "sqlite://"


def resolve_storage_uri(uri: str, *, base_dir: str | os.PathLike[str]) -> str:
    """Make a storage URI independent of the current directory.

    A ``sqlite:///relative.db`` URI read from a budgets file names a file relative to
    that file's folder: it is returned with the path made absolute against
    ``base_dir``. Every other URI is returned unchanged.

    Args:
        uri: a storage URI.
        base_dir: the folder of the budgets file the URI comes from.

    Returns:
        The URI to open.

    Raises:
        ConfigError: a ``sqlite://`` URI is malformed.
    """
    if not _is_sqlite(uri):
        return uri
    from payi_guard.ledger.sqlite import resolve_sqlite_uri

    return resolve_sqlite_uri(uri, base_dir=base_dir)
