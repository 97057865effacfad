"""Settings of the provider replays: loopback only, LiteLLM offline.

Every replay talks to a server on 127.0.0.1. The ``loopback_only`` fixture makes any
other connection (or host name lookup) fail the test at once, so a client that ignores
its ``base_url`` can never reach a real provider. LiteLLM fetches its model price map
(and other catalogs) when it is imported, retrying for seconds when that fails; its
offline mode uses the copies it ships, and is set before any test imports it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from conformance.providers.server import ReplayServer

os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

_LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _is_local(host: object) -> bool:
    if host is None:
        return True
    text = host.decode() if isinstance(host, bytes) else str(host)
    if text in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(text.split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse every connection and name lookup that is not for this machine."""
    getaddrinfo = socket.getaddrinfo
    connect = socket.socket.connect
    connect_ex = socket.socket.connect_ex

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_local(host):
            raise OSError(f"replays stay on loopback: lookup of {host!r} refused")
        return getaddrinfo(host, *args, **kwargs)

    def _check(address: Any) -> None:
        if isinstance(address, tuple) and not _is_local(address[0]):
            raise OSError(f"replays stay on loopback: connection to {address!r} refused")

    def guarded_connect(self: socket.socket, address: Any) -> None:
        _check(address)
        connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> int:
        _check(address)
        return connect_ex(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)


@pytest.fixture(scope="module")
def replay_server() -> Iterator[ReplayServer]:
    """One loopback server per test module, loaded with each replay's exchanges."""
    with ReplayServer() as server:
        yield server
