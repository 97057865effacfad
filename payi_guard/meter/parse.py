"""Pure parsing of GenAI HTTP traffic: endpoints, request bodies, usage objects.

Nothing here does I/O. The guarding transport uses these pieces in this order:

1. :func:`classify` tells a metered call (``POST .../chat/completions``) from traffic
   that passes through untouched (file uploads, listing models, ``count_tokens``).
2. :meth:`RequestInfo.parse` reads the JSON body: model, ``stream``, ``n``, the output
   cap. A body that is not JSON gives ``None`` and is passed through byte for byte.
3. :func:`inject_include_usage` asks an OpenAI chat (or legacy completions) stream for
   its final usage chunk; :func:`encode_body` serialises the changed body.
4. A plain response goes to :func:`usage_from_response`; a stream to
   :mod:`payi_guard.meter.streams`, which reads the same usage objects.

Token counts follow one convention whatever the provider
(:class:`~payi_guard.meter.usage_objects.ParsedUsage`, read by
:mod:`payi_guard.meter.usage_objects`): ``input_tokens`` excludes cache reads and cache
writes, ``output_tokens`` includes reasoning tokens.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final
from urllib.parse import unquote

from payi_guard._frozen import frozen_maker
from payi_guard.meter.request_body import (
    encode_body,
    inject_include_usage,
    loads_json,
    with_include_usage,
)
from payi_guard.meter.tokens import EndpointKind, request_output_cap
from payi_guard.meter.usage_objects import (
    ParsedUsage,
    anthropic_usage,
    openai_usage,
    responses_file_searches,
    responses_usage,
    responses_web_searches,
)

__all__ = [
    "Endpoint",
    "EndpointKind",
    "ParsedUsage",
    "RequestInfo",
    "anthropic_usage",
    "classify",
    "encode_body",
    "inject_include_usage",
    "loads_json",
    "openai_usage",
    "responses_file_searches",
    "responses_usage",
    "responses_web_searches",
    "usage_from_response",
    "with_include_usage",
]

_AZURE_HOST_SUFFIXES: Final = (
    ".openai.azure.com",
    ".cognitiveservices.azure.com",
    ".services.ai.azure.com",
)

_PORT: Final = re.compile(r":\d+$")

# Path suffixes (as segment tuples) of the metered OpenAI-style endpoints, longest first
# so that ``chat/completions`` wins over ``completions``.
_OPENAI_SUFFIXES: Final[tuple[tuple[tuple[str, ...], EndpointKind], ...]] = (
    (("chat", "completions"), "chat"),
    (("responses", "compact"), "responses"),
    (("responses",), "responses"),
    (("embeddings",), "embeddings"),
    (("completions",), "completions"),
)


# ---------------------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A metered GenAI endpoint, as recognised by :func:`classify`.

    Attributes:
        kind: ``"chat"``, ``"responses"``, ``"embeddings"``, ``"completions"`` or
            ``"anthropic_messages"``.
        provider: ``"anthropic"`` for the Messages API, ``"google"`` for Claude on
            Vertex AI, ``"azure"`` for an Azure OpenAI path or host, else ``"openai"``
            (OpenAI itself or any OpenAI-compatible server behind a custom ``base_url``).
        deployment: the Azure deployment named in the path
            (``/openai/deployments/{deployment}/...``), or the model a Vertex AI path
            names (``.../publishers/anthropic/models/{model}:rawPredict``), if any.
    """

    kind: EndpointKind
    provider: str = "openai"
    deployment: str | None = None

    @property
    def supports_include_usage(self) -> bool:
        """Whether a stream of this endpoint reports usage only when asked to.

        True for chat and legacy completions: their streams carry usage only with
        ``stream_options.include_usage``. Responses and Anthropic streams always do.
        """
        return self.kind in ("chat", "completions")


def classify(method: str, path: str, host: str | None = None) -> Endpoint | None:
    """Recognise a metered GenAI call from its method and URL path.

    Only ``POST`` requests are calls. Matching is on the end of the path, so any prefix
    works: ``/v1/chat/completions`` on OpenAI, ``/custom/v1/chat/completions`` behind an
    OpenAI-compatible ``base_url``, Azure's
    ``/openai/deployments/{deployment}/chat/completions?api-version=...``. Anthropic's
    Messages API must end in ``/v1/messages``; ``/v1/messages/count_tokens`` and message
    batches are not metered. Claude on Vertex AI (``anthropic.AnthropicVertex``):
    ``.../publishers/anthropic/models/{model}:rawPredict`` and ``:streamRawPredict``.
    ``/responses/compact`` is metered as a Responses call (it runs the model and reports
    the same usage object). Everything else (files, audio, models, fine-tuning,
    stored-completion listings) is passthrough.

    Args:
        method: the HTTP method.
        path: the URL path; a query string, if present, is ignored.
        host: the host the request goes to, used only to tell Azure from OpenAI.

    Returns:
        The :class:`Endpoint`, or ``None`` for traffic that is not metered.
    """
    key = (method, path, host)
    try:
        return _classified[key]
    except KeyError:
        pass
    endpoint = _classify(method, path, host)
    if len(_classified) >= _CLASSIFIED_SIZE:
        _classified.clear()  # bounded; the few paths an app calls come back at once
    _classified[key] = endpoint
    return endpoint


# Endpoints are immutable, so one per (method, path, host) is shared by every call.
_CLASSIFIED_SIZE: Final = 1024
_classified: dict[tuple[str, str, str | None], Endpoint | None] = {}


def _classify(method: str, path: str, host: str | None) -> Endpoint | None:
    if method.upper() != "POST":
        return None
    segments = [s for s in path.split("?", 1)[0].split("#", 1)[0].split("/") if s]
    if segments[-2:] == ["v1", "messages"]:
        return Endpoint("anthropic_messages", provider="anthropic")
    if segments[-4:-1] == ["publishers", "anthropic", "models"]:
        return _vertex_anthropic(segments[-1])
    for suffix, kind in _OPENAI_SUFFIXES:
        if tuple(segments[-len(suffix) :]) != suffix:
            continue
        prefix = segments[: -len(suffix)]
        deployment = None
        if len(prefix) >= 2 and prefix[-2] == "deployments":
            deployment = unquote(prefix[-1])
        azure = deployment is not None or _is_azure_host(host)
        return Endpoint(kind, provider="azure" if azure else "openai", deployment=deployment)
    return None


# The methods of Vertex AI's Anthropic models that run the Messages API.
_VERTEX_METHODS: Final = frozenset({"rawPredict", "streamRawPredict"})


def _vertex_anthropic(segment: str) -> Endpoint | None:
    """``{model}:rawPredict`` or ``:streamRawPredict`` of Claude on Vertex AI.

    The body is a Messages request without its model, which the path names (``@`` and
    ``;`` may come percent-encoded); ``count-tokens:rawPredict`` counts tokens and is
    not metered. Charged under ``google``: Vertex AI's prices.
    """
    model, _, method = unquote(segment).rpartition(":")
    if method not in _VERTEX_METHODS or not model or model == "count-tokens":
        return None
    return Endpoint("anthropic_messages", provider="google", deployment=model)


def _is_azure_host(host: str | None) -> bool:
    if not host:
        return False
    name = _PORT.sub("", host.strip().lower()).rstrip(".")
    return name.endswith(_AZURE_HOST_SUFFIXES)


# ---------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a metered request asks for, read from its JSON body.

    Attributes:
        endpoint: the endpoint the request was sent to.
        model: the ``model`` field; for an Azure deployment path whose body has no model,
            the deployment name; ``None`` when neither is known.
        stream: whether ``stream`` is true.
        n: how many choices are requested (``n``, chat and legacy completions); 1 when
            absent or invalid.
        include_usage: whether ``stream_options.include_usage`` is already true.
        max_output_tokens: the output cap the request sets (``max_completion_tokens``,
            else ``max_tokens`` for chat; ``max_output_tokens`` for Responses;
            ``max_tokens`` for legacy completions and Anthropic), per choice; ``None``
            when absent.
        body: the parsed body (not part of equality).
    """

    endpoint: Endpoint
    model: str | None
    stream: bool
    n: int
    include_usage: bool
    max_output_tokens: int | None
    body: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def parse(
        cls, endpoint: Endpoint, body_bytes: bytes, content_type: str | None
    ) -> RequestInfo | None:
        """Parse a request body.

        Args:
            endpoint: the endpoint from :func:`classify`.
            body_bytes: the raw request body.
            content_type: the request's ``Content-Type`` header, if any. A type that is
                not JSON (``multipart/form-data``) gives ``None`` without parsing.

        Returns:
            The :class:`RequestInfo`, or ``None`` when the body is not a JSON object (the
            transport then passes the request through untouched).
        """
        if content_type is not None and not _is_json_type(content_type):
            return None
        if not body_bytes:
            return None
        try:
            body = loads_json(body_bytes)
        except (ValueError, UnicodeDecodeError):
            return None
        # JSON gives exact dicts and strings: no subclass checks.
        if type(body) is not dict:
            return None
        get = body.get
        model = get("model")
        if type(model) is not str or not model:
            model = endpoint.deployment
        stream_options = get("stream_options")
        include_usage = type(stream_options) is dict and stream_options.get("include_usage") is True
        kind = endpoint.kind
        n = 1
        if kind == "chat" or kind == "completions":
            n = _positive_int(get("n")) or 1
        make = make_request_info if cls is RequestInfo else cls
        return make(
            endpoint,
            model,
            get("stream") is True,
            n,
            include_usage,
            request_output_cap(kind, body),
            body,
        )


def _is_json_type(content_type: str) -> bool:
    try:
        return _json_types[content_type]
    except KeyError:
        pass
    media = content_type.split(";", 1)[0].strip().lower()
    is_json = media == "application/json" or media.endswith("+json")
    if len(_json_types) >= _JSON_TYPES_SIZE:
        _json_types.clear()  # bounded; an app sends one or two content types
    _json_types[content_type] = is_json
    return is_json


_JSON_TYPES_SIZE: Final = 64
make_request_info: Final = frozen_maker(RequestInfo)
"""``RequestInfo(...)``, every field given, without ``__init__``'s cost."""

_json_types: dict[str, bool] = {}


def usage_from_response(endpoint: Endpoint, json_obj: object) -> ParsedUsage:
    """Read the usage of a plain (non-streamed) JSON response.

    Args:
        endpoint: the endpoint the request was sent to.
        json_obj: the parsed response body.

    Returns:
        The :class:`ParsedUsage`; ``complete`` is false (and counts are zero) when the
        body carries no usage object, as some OpenAI-compatible servers do.
    """
    if type(json_obj) is not dict and not isinstance(json_obj, Mapping):
        return ParsedUsage()
    usage = json_obj.get("usage")
    if endpoint.kind == "responses" and not isinstance(usage, Mapping):
        # Responses stream events wrap the response object; accept either.
        inner = json_obj.get("response")
        if isinstance(inner, Mapping):
            json_obj = inner
            usage = inner.get("usage")
    if type(usage) is not dict and not isinstance(usage, Mapping):
        return ParsedUsage()
    if endpoint.kind == "anthropic_messages":
        model = json_obj.get("model")
        return anthropic_usage(
            usage, complete=True, model=model if isinstance(model, str) else None
        )
    if endpoint.kind == "responses":
        return replace(
            responses_usage(usage),
            web_searches=responses_web_searches(json_obj),
            file_searches=responses_file_searches(json_obj),
        )
    return openai_usage(usage, output=endpoint.kind != "embeddings")


def _positive_int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
