"""AWS Bedrock through ``boto3`` ``bedrock-runtime`` (``payi-guard[bedrock]``).

What is metered: ``converse``, ``converse_stream``, ``invoke_model`` and
``invoke_model_with_response_stream``, for every model family (Anthropic, Meta, Amazon
Nova and Titan, Mistral, ...). ``apply_guardrail``, ``count_tokens``, async invocations
and the other services pass through. botocore sends through urllib3, not httpx: the
guard replaces the HTTP session of the client's endpoint (:class:`GuardedSession`),
which sees every attempt of every call. The same wire format also meters LiteLLM's
Bedrock route (which signs its own requests and sends them through httpx).

The wire (:class:`BedrockDialect`):

* the model is in the URL, ``/model/{modelId}/{operation}`` (percent-encoded; a model
  id, a cross-region inference profile such as ``us.anthropic...``, or an ARN),
  priced under genai-prices' ``aws`` provider, which resolves regions and inference
  profiles to the model's price. An application inference profile ARN does not name
  its model: it follows the ``unknown_model`` policy (or a ``prices:`` entry);
* the bound: every text of the body (Converse blocks, or the model family's own body
  for ``invoke``), an allowance per image and per document / video; output
  ``inferenceConfig.maxTokens`` (Converse) or the family's field (``max_tokens``,
  ``max_gen_len``, ``textGenerationConfig.maxTokenCount``,
  ``inferenceConfig.max_new_tokens``...), else the model's cap;
* usage: ``converse`` returns ``usage`` (``inputTokens`` excludes
  ``cacheReadInputTokens`` and ``cacheWriteInputTokens``); ``converse-stream`` ends with
  a ``metadata`` event holding the same; ``invoke`` answers with
  ``X-Amzn-Bedrock-{Input,Output,Cache-Read-Input,Cache-Write-Input}-Token-Count``
  headers, whatever the family; a response stream's last chunk carries
  ``amazon-bedrock-invocationMetrics``. Where those are missing (a guardrail blocked
  the input) the family's own counts are read.

Requests are signed (SigV4): the guard never changes a header or a byte of the body.
The response body passes through unchanged while the event stream is decoded
incrementally. A refusal is raised as the client's own
``client.exceptions.ThrottlingException`` (``AccessDeniedException`` for an unknown
model) that is also the payi_guard refusal, from the HTTP session, where botocore's
retry handlers (legacy, standard and adaptive) never retry it.

One module per part: :mod:`~payi_guard.meter.providers.bedrock_wire` (the dialect:
endpoints and bounds), :mod:`~payi_guard.meter.providers.bedrock_usage` (the usage a
response reports), :mod:`~payi_guard.meter.providers.bedrock_streams` (the event-stream
responses), :mod:`~payi_guard.meter.providers.bedrock_session` (the guarded HTTP session
and refusals); this one installs the session on clients (``wrap``, ``instrument``).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from payi_guard.engine import Guard
from payi_guard.meter.options import MeterOptions
from payi_guard.meter.providers.bedrock_session import GuardedSession
from payi_guard.meter.providers.bedrock_wire import DIALECT, SERVICE, BedrockDialect
from payi_guard.meter.providers.hooks import Patches

__all__ = [
    "DIALECT",
    "BedrockDialect",
    "GuardedSession",
    "guarded_by",
    "http_client_of",
    "instrument",
    "uninstrument",
    "wrap",
]


@dataclass
class _Installed:
    guard: Guard
    source: str
    original: Any


_lock = threading.RLock()
_installed: weakref.WeakKeyDictionary[Any, _Installed] = weakref.WeakKeyDictionary()
_patches = Patches()


def _check(client: Any) -> Any:
    meta = getattr(client, "meta", None)
    service = getattr(getattr(meta, "service_model", None), "service_name", None)
    endpoint = getattr(client, "_endpoint", None)
    if service != SERVICE or endpoint is None or not hasattr(endpoint, "http_session"):
        raise TypeError(
            f"cannot guard {type(client).__name__}: only boto3 'bedrock-runtime' clients "
            f"are metered (this one is {service!r})"
        )
    return endpoint


def _guard(client: Any, guard: Guard, options: MeterOptions, source: str) -> None:
    endpoint = _check(client)
    with _lock:
        existing = _installed.get(endpoint)
        if existing is not None:
            if not (source == "wrap" and existing.source == "instrument"):
                return
            endpoint.http_session = existing.original
        original = endpoint.http_session
        endpoint.http_session = GuardedSession(original, guard, options, client.exceptions)
        _installed[endpoint] = _Installed(guard, source, original)


def wrap(guard: Guard, client: Any, options: MeterOptions) -> None:
    """Guard a boto3 ``bedrock-runtime`` client.

    Raises:
        TypeError: the client is not a ``bedrock-runtime`` client.
    """
    _guard(client, guard, options, "wrap")


def _guarding(original: Callable[..., Any]) -> Callable[..., Any]:
    def _make_request(self: Any, *args: Any, **kwargs: Any) -> Any:
        endpoint = getattr(self, "_endpoint", None)
        if endpoint is not None and endpoint not in _installed:
            _guard_on_first_use(self)
        return original(self, *args, **kwargs)

    _make_request.__wrapped__ = original  # type: ignore[attr-defined]
    _make_request.__doc__ = original.__doc__
    return _make_request


def _guard_on_first_use(client: Any) -> None:
    from payi_guard.meter.clients import instrumenting

    meta = getattr(client, "meta", None)
    if getattr(getattr(meta, "service_model", None), "service_name", None) != SERVICE:
        return
    current = instrumenting()
    if current is not None:
        _guard(client, current[0], current[1], "instrument")


def instrument(guard: Guard, options: MeterOptions) -> None:
    """Guard every ``bedrock-runtime`` client on its first call.

    Patches ``botocore.client.BaseClient._make_request`` once botocore is imported.
    """
    if _patches.start():
        _patches.when_imported(
            "botocore.client",
            lambda module: _patches.replace(module.BaseClient, "_make_request", _guarding),
        )


def uninstrument(guard: Guard) -> None:
    """Restore ``_make_request`` and the sessions ``instrument`` replaced."""
    _patches.undo()
    with _lock:
        for endpoint, installed in list(_installed.items()):
            if installed.source == "instrument":
                if isinstance(endpoint.http_session, GuardedSession):
                    endpoint.http_session = installed.original
                del _installed[endpoint]


def guarded_by(client: Any) -> Guard | None:
    """The guard of a boto3 client, if guarded."""
    endpoint = getattr(client, "_endpoint", None)
    with _lock:
        installed = _installed.get(endpoint) if endpoint is not None else None
    return None if installed is None else installed.guard


def http_client_of(client: Any) -> Any:
    """Botocore clients have no httpx client."""
    return None
