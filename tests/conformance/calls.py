"""Rebuilding each recorded call with the real SDK, and recording what the app gets.

The recorded request is turned back into an SDK call: the path picks the method
(``/chat/completions`` -> ``client.chat.completions``, ``/v1/messages?beta=true`` ->
``client.beta.messages``...), the JSON body gives the keyword arguments (names the
method does not know go in ``extra_body``). A *variant* says how the app makes the call:

``create``
    the method as recorded (a stream is read to its end);
``raw``
    ``with_raw_response`` (status, headers and the parsed object);
``parse``
    ``.parse()`` with a pydantic model built from the recorded JSON schema;
``helper``
    the SDK's ``.stream()`` helper: every event, then the final object;
``no_usage``
    a chat stream recorded with ``include_usage``, made without ``stream_options``;
``break``
    a stream the app leaves after its first item (loopback only: the server holds the
    rest of the stream until the app has closed it, as a provider still generating);
``default``
    embeddings without ``encoding_format`` (the SDK asks for base64 and decodes it).

What the app gets is reduced to plain data (:func:`snapshot`): for every object, its
``model_dump()``, ``to_json()`` and the ``model_fields_set`` of every nested model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import anthropic
import httpx2
import openai
import pydantic

from conformance.corpus import Interaction

Transport = Literal["loopback", "memory"]

TRANSPORTS: tuple[Transport, ...] = ("loopback", "memory")

# Headers that differ between two identical requests, whoever sends them.
_VOLATILE_HEADERS = frozenset({"date", "x-stainless-retry-count", "idempotency-key"})


def variants(interaction: Interaction, transport: Transport) -> list[str]:
    """The ways the app makes the recorded call that fit the recording.

    Every interaction is made as recorded over both transports. The other variants only
    change what the SDK does with a response, so they run on loopback, except the
    stream variants, whose settling depends on how the body arrives.
    """
    kind = interaction.kind
    streamed = interaction.request.get("stream") is True
    if not interaction.ok:
        return ["create"]
    names = ["create"]
    if streamed:
        names.append("helper")
        if kind == "chat" and interaction.asked_include_usage:
            names.append("no_usage")
        if transport == "loopback":
            names.append("break")
        return names
    if transport == "memory":
        return names
    if kind == "embeddings":
        names.append("default")
    elif kind != "completions":
        names.append("raw")
        if _json_schema(interaction) is not None:
            names.append("parse")
    return names


# ---------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------

_SUFFIXES = ("/chat/completions", "/responses", "/embeddings", "/completions")


def azure_deployment(interaction: Interaction) -> str | None:
    """The Azure deployment named in the URL, if the call went to one."""
    segments = urlsplit(interaction.url).path.split("/")
    if "deployments" in segments:
        index = segments.index("deployments")
        if index + 1 < len(segments):
            return segments[index + 1]
    return None


def make_client(interaction: Interaction, http_client: httpx2.Client) -> Any:
    """The SDK client the recorded call was made with, aimed at its recorded host."""
    parts = urlsplit(interaction.url)
    origin = f"{parts.scheme}://{parts.netloc}"
    if interaction.kind == "messages":
        return anthropic.Anthropic(
            api_key="replay", base_url=origin, http_client=http_client, max_retries=0
        )
    if azure_deployment(interaction) is not None:
        version = parse_qs(parts.query).get("api-version", ["2024-10-21"])[0]
        return openai.AzureOpenAI(
            api_key="replay",
            azure_endpoint=origin,
            api_version=version,
            http_client=http_client,
            max_retries=0,
        )
    path = parts.path
    for suffix in _SUFFIXES:
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    return openai.OpenAI(
        api_key="replay", base_url=origin + path, http_client=http_client, max_retries=0
    )


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------


def _split(method: Callable[..., Any], body: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``method``: known names as such, the rest in ``extra_body``."""
    known = set(inspect.signature(method).parameters)
    kwargs = {k: v for k, v in body.items() if k in known}
    extra = {k: v for k, v in body.items() if k not in known}
    if extra:
        kwargs["extra_body"] = extra
    return kwargs


def _json_schema(interaction: Interaction) -> Mapping[str, Any] | None:
    """The JSON schema of a structured-output request (chat or Responses), if any."""
    body = interaction.request
    fmt: Any = body.get("response_format")
    if interaction.kind == "responses":
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, Mapping) else None
        if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
            schema = fmt.get("schema")
            return schema if isinstance(schema, Mapping) else None
        return None
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        inner = fmt.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, Mapping) else None
        return schema if isinstance(schema, Mapping) else None
    return None


_JSON_TYPES: Mapping[str, type] = {
    "string": str,
    "integer": int,
    "number": float,
    "boolean": bool,
    "array": list,
    "object": dict,
}


def schema_model(schema: Mapping[str, Any], name: str = "Recorded") -> type[pydantic.BaseModel]:
    """A pydantic model for a flat recorded JSON schema (what ``.parse()`` takes)."""
    properties: Mapping[str, Any] = schema.get("properties") or {}
    required = set(schema.get("required") or ())
    fields: dict[str, Any] = {}
    for prop, spec in properties.items():
        py_type: Any = _JSON_TYPES.get(str(spec.get("type")), object)
        fields[prop] = (py_type, ...) if prop in required else (py_type | None, None)
    config = pydantic.ConfigDict(extra="forbid")
    model: type[pydantic.BaseModel] = pydantic.create_model(name, __config__=config, **fields)
    return model


def strict_tools(tools: Any) -> Any:
    """The function tools marked ``strict``, as ``.parse()`` requires of them."""
    if not isinstance(tools, list):
        return tools
    out: list[Any] = []
    for tool in tools:
        if isinstance(tool, Mapping) and isinstance(tool.get("function"), Mapping):
            tool = {**tool, "function": {**tool["function"], "strict": True}}
        elif isinstance(tool, Mapping) and tool.get("type") == "function":
            tool = {**tool, "strict": True}
        out.append(tool)
    return out


# ---------------------------------------------------------------------------------------
# What the app sees
# ---------------------------------------------------------------------------------------


def fields_set(value: Any) -> Any:
    """The ``model_fields_set`` of ``value`` and of every model nested in it."""
    if isinstance(value, pydantic.BaseModel):
        return {
            "__set__": sorted(value.model_fields_set),
            **{name: fields_set(getattr(value, name)) for name in type(value).model_fields},
        }
    if isinstance(value, (list, tuple)):
        return [fields_set(v) for v in value]
    if isinstance(value, dict):
        return {k: fields_set(v) for k, v in value.items()}
    return None


def snapshot(value: Any) -> Any:
    """What the app can observe of ``value``, as plain comparable data."""
    if isinstance(value, pydantic.BaseModel):
        to_json = getattr(value, "to_json", None)
        return {
            "type": type(value).__qualname__,
            "model_dump": value.model_dump(warnings=False),
            "to_json": to_json(warnings=False)
            if callable(to_json)
            else value.model_dump_json(warnings=False),
            "fields_set": fields_set(value),
        }
    if isinstance(value, (list, tuple)):
        return [snapshot(v) for v in value]
    return value


def _headers(headers: httpx2.Headers) -> list[tuple[str, str]]:
    return sorted((k, v) for k, v in headers.items() if k not in _VOLATILE_HEADERS)


def error_snapshot(exc: BaseException) -> dict[str, Any]:
    """What the app can observe of an exception raised by the SDK."""
    response = getattr(exc, "response", None)
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "status_code": getattr(exc, "status_code", None),
        "body": getattr(exc, "body", None),
        "message": str(exc),
        "headers": _headers(response.headers) if isinstance(response, httpx2.Response) else None,
    }


@dataclass
class Observed:
    """Everything the app got from one call.

    Attributes:
        items: the snapshots, in the order the app received them.
        error: the snapshot of the exception the app got, if any.
        request_headers: the headers of the request object the app can reach
            (``raw.http_request``), for ``with_raw_response`` calls.
    """

    items: list[Any] = field(default_factory=list)
    error: dict[str, Any] | None = None
    request_headers: list[tuple[str, str]] | None = None


def _stream_items(stream: Any) -> Iterator[Any]:
    for item in stream:
        yield snapshot(item)


def call(
    interaction: Interaction,
    variant: str,
    client: Any,
    *,
    on_break: Callable[[], None] | None = None,
) -> Observed:
    """Make the recorded call as ``variant`` says; record what the app gets."""
    observed = Observed()
    try:
        _call(interaction, variant, client, observed, on_break)
    except (openai.APIError, anthropic.APIError) as exc:
        observed.error = error_snapshot(exc)
    return observed


def _resource(interaction: Interaction, client: Any) -> Any:
    kind = interaction.kind
    if kind == "messages":
        return client.beta.messages if interaction.beta else client.messages
    if kind == "chat":
        return client.chat.completions
    return getattr(client, kind)


def _call(
    interaction: Interaction,
    variant: str,
    client: Any,
    observed: Observed,
    on_break: Callable[[], None] | None,
) -> None:
    resource = _resource(interaction, client)
    body = dict(interaction.request)
    deployment = azure_deployment(interaction)
    if deployment is not None:
        body["model"] = deployment
    items = observed.items
    if variant == "create" or variant == "no_usage" or variant == "default":
        if variant == "no_usage":
            body.pop("stream_options", None)
        if variant == "default":
            body.pop("encoding_format", None)
        result = resource.create(**_split(resource.create, body))
        if body.get("stream") is True:
            with result as stream:
                items.extend(_stream_items(stream))
        else:
            items.append(snapshot(result))
        return
    if variant == "raw":
        raw = resource.with_raw_response.create(**_split(resource.create, body))
        items.append({"status": raw.status_code, "headers": _headers(raw.headers)})
        observed.request_headers = _headers(raw.http_request.headers)
        items.append(snapshot(raw.parse()))
        return
    if variant == "parse":
        schema = _json_schema(interaction)
        assert schema is not None
        model = schema_model(schema)
        if "tools" in body:
            body["tools"] = strict_tools(body["tools"])
        if interaction.kind == "responses":
            body.pop("text", None)
            items.append(
                snapshot(resource.parse(text_format=model, **_split(resource.parse, body)))
            )
        else:
            body["response_format"] = model
            items.append(snapshot(resource.parse(**_split(resource.parse, body))))
        return
    if variant == "helper":
        body.pop("stream", None)
        with resource.stream(**_split(resource.stream, body)) as stream:
            items.extend(_stream_items(stream))
            items.append(snapshot(_final(interaction, stream)))
        return
    if variant == "break":
        result = resource.create(**_split(resource.create, body))
        with result as stream:
            for item in stream:
                items.append(snapshot(item))
                break
        if on_break is not None:
            on_break()
        return
    raise ValueError(f"unknown variant {variant!r}")


def _final(interaction: Interaction, stream: Any) -> Any:
    if interaction.kind == "messages":
        return stream.get_final_message()
    if interaction.kind == "responses":
        return stream.get_final_response()
    return stream.get_final_completion()


@contextmanager
def sdk_client(interaction: Interaction, transport: httpx2.BaseTransport) -> Iterator[Any]:
    """An SDK client for ``interaction`` over ``transport``, closed afterwards."""
    http_client = httpx2.Client(transport=transport)
    client = make_client(interaction, http_client)
    try:
        yield client
    finally:
        client.close()
