"""How the Redis ledgers send their scripts: ``EVALSHA`` on a pooled connection, chosen once.

A factory-made client has retries off, so its scripts need none of
``Redis.execute_command``'s layers: :func:`evalsha` (and :func:`aevalsha`) take a
connection of the pool, send the command packed by hiredis (:func:`command_packer`),
read the raw reply and give the connection back, dropping it on a transport error. A
caller's own client (a cluster, a single-connection client, retries on) is sent
``execute_command``. :func:`script_sender` and :func:`async_script_sender` make the
choice once per ledger. The deadlines and the tagging of unknown outcomes live in the
connections themselves (:mod:`~payi_guard.ledger._redisconn`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from payi_guard.ledger._redisconn import transport_errors

__all__ = [
    "AsyncScriptSender",
    "Packer",
    "ScriptSender",
    "aevalsha",
    "async_script_sender",
    "command_packer",
    "direct_pool",
    "evalsha",
    "script_sender",
]


def direct_pool(client: Any) -> Any:
    """The connection pool :func:`evalsha` may run ``client``'s scripts on, or ``None``.

    Only a plain ``redis.Redis`` client (a URL's or Sentinel's, never a cluster or a
    single-connection client) whose pool hands out a connection without arguments
    (redis-py 6 and later) and whose retries are off, as the factory makes them.
    """
    pool = getattr(client, "connection_pool", None)
    if pool is None or getattr(client, "connection", None) is not None:
        return None
    try:
        first = next(iter(inspect.signature(pool.get_connection).parameters.values()), None)
    except (TypeError, ValueError):
        return None
    if first is not None and first.default is inspect.Parameter.empty:
        return None
    retry = getattr(client, "retry", None) or pool.connection_kwargs.get("retry")
    if retry is None or retry.get_retries() != 0:
        return None
    return pool


Packer = Callable[[tuple[Any, ...]], bytes]
"""Packs a command (its name and arguments) into the bytes sent (see :func:`command_packer`)."""


def evalsha(
    pool: Any,
    pack: Packer | None,
    sha: str,
    keys: Sequence[str],
    args: Sequence[str],
) -> Any:
    """``EVALSHA`` on a connection of ``pool`` (see :func:`direct_pool`); its raw reply.

    What ``Redis.execute_command`` does for a script with retries off (redis-py has no
    reply callback for ``EVALSHA``), without its layers: take a connection, send (packed
    by ``pack``, from :func:`command_packer`, if given), read, drop the connection on a
    connection error or timeout, give it back.
    """
    connection = pool.get_connection()
    try:
        if pack is None:
            connection.send_command("EVALSHA", sha, len(keys), *keys, *args)
        else:
            connection.send_packed_command([pack(("EVALSHA", sha, len(keys), *keys, *args))])
        return connection.read_response()
    except BaseException as exc:
        if isinstance(exc, transport_errors()):
            connection.disconnect()
        raise
    finally:
        reconnect = getattr(connection, "should_reconnect", None)
        if reconnect is not None and reconnect():
            connection.disconnect()
        pool.release(connection)


def command_packer(pool: Any) -> Packer | None:
    """The packer of hiredis when it packs as ``pool``'s connections would, else ``None``.

    redis-py packs in Python (sync: a pass over every argument before hiredis); hiredis
    alone gives the same bytes for text in UTF-8 with strict errors, a pool's default.
    """
    kwargs = getattr(pool, "connection_kwargs", {})
    if (
        kwargs.get("encoding", "utf-8") != "utf-8"
        or kwargs.get("encoding_errors", "strict") != "strict"
    ):
        return None
    try:
        import hiredis
    except ImportError:
        return None
    pack: Packer = hiredis.pack_command
    return pack


async def aevalsha(
    pool: Any,
    pack: Packer | None,
    sha: str,
    keys: Sequence[str],
    args: Sequence[str],
) -> Any:
    """The asyncio twin of :func:`evalsha`, for a ``redis.asyncio`` pool.

    A cancellation while the reply is awaited reaches the connection's own read, which
    drops the connection (the reply would otherwise be read as the next command's).
    """
    connection = await pool.get_connection()
    try:
        if pack is None:
            await connection.send_command("EVALSHA", sha, len(keys), *keys, *args)
        else:
            await connection.send_packed_command(pack(("EVALSHA", sha, len(keys), *keys, *args)))
        return await connection.read_response()
    except BaseException as exc:
        if isinstance(exc, transport_errors()):
            await connection.disconnect()
        raise
    finally:
        await pool.release(connection)


ScriptSender = Callable[[str, Sequence[str], Sequence[str]], Any]
"""Sends ``EVALSHA sha`` with keys and arguments; returns the raw reply."""
AsyncScriptSender = Callable[[str, Sequence[str], Sequence[str]], Awaitable[Any]]
"""The asyncio :data:`ScriptSender`."""


def script_sender(client: Any, *, direct: bool) -> ScriptSender:
    """How a sync ledger sends its scripts on ``client``, chosen once.

    ``direct`` (a factory-made client): :func:`evalsha` on its pool when
    :func:`direct_pool` allows, packed by hiredis when :func:`command_packer` allows;
    otherwise ``client.execute_command``.
    """
    pool = direct_pool(client) if direct else None
    if pool is not None:
        return functools.partial(evalsha, pool, command_packer(pool))

    def send(sha: str, keys: Sequence[str], args: Sequence[str]) -> Any:
        return client.execute_command("EVALSHA", sha, len(keys), *keys, *args)

    return send


def async_script_sender(client: Any, *, direct: bool) -> AsyncScriptSender:
    """The asyncio :func:`script_sender` (:func:`aevalsha`), chosen once."""
    pool = direct_pool(client) if direct else None
    if pool is not None:
        return functools.partial(aevalsha, pool, command_packer(pool))

    async def send(sha: str, keys: Sequence[str], args: Sequence[str]) -> Any:
        return await client.execute_command("EVALSHA", sha, len(keys), *keys, *args)

    return send
