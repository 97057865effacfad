"""The site's OpenAI clients, guarded by the guard the middleware built.

Every call made with them is charged to the user of the request that made it. The
endpoint is ``EXAMPLE_OPENAI_BASE_URL`` when set, else a
:class:`~payi_guard.testing.FakeProvider` started in this process on first use, so the
site runs offline with a dummy key.
"""

from __future__ import annotations

import functools
import os
import threading

import openai

from payi_guard.django import get_guard
from payi_guard.testing import FakeProvider

MODEL = "gpt-4o-mini"

_lock = threading.Lock()
_provider: FakeProvider | None = None


def base_url() -> str:
    """The OpenAI-compatible endpoint the site calls."""
    global _provider
    url = os.environ.get("EXAMPLE_OPENAI_BASE_URL")
    if url:
        return url
    with _lock:
        if _provider is None:
            # Started lazily: a server started before gunicorn forks would not survive.
            _provider = FakeProvider().start()
        return _provider.openai_base_url


@functools.cache
def client() -> openai.OpenAI:
    """The sync client, shared by every request."""
    guarded: openai.OpenAI = get_guard().wrap(
        openai.OpenAI(base_url=base_url(), api_key=os.environ.get("OPENAI_API_KEY", "test"))
    )
    return guarded


def async_client() -> openai.AsyncOpenAI:
    """A new async client; use it as ``async with`` (one per request).

    Under WSGI, Django runs each async view in an event loop of its own, and an async
    HTTP client must not outlive its loop.
    """
    guarded: openai.AsyncOpenAI = get_guard().wrap(
        openai.AsyncOpenAI(base_url=base_url(), api_key=os.environ.get("OPENAI_API_KEY", "test"))
    )
    return guarded
