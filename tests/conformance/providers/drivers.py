"""Drive the real provider SDKs against a loopback server and read the usage they expose.

One driver per call kind (``genai.generate``, ``bedrock.invoke_stream``, ``litellm.astream``
...). A driver builds a fresh client aimed at the server, makes the call once per
recorded exchange, consumes the whole response as an application would (every stream
iterated to its end), and returns, per call, the usage the SDK handed to the
application, flattened by :func:`flatten_counts`.

The request arguments are minimal: the server answers with the recording whatever the
request says, and the tests compare the request path the SDK built with the recorded
one. Bedrock ``InvokeModel`` sends the recorded request body unchanged (the body is the
model family's own JSON, opaque to the SDK).

Besides the usage, each driver writes a transcript of everything the application got:
every response object and every stream chunk or event, in JSON form
(:func:`app_view`). The guarded replays compare it with the bare one.

Every client gets dummy credentials and no retries, so a replay that went wrong fails at
once instead of retrying against a server with nothing left to send. ``prepare`` is
called with each SDK client right after it is built and its result is used instead (the
guarded replays pass ``guard.wrap``); LiteLLM has no client object, so its drivers do not
call it. SDKs are imported inside the drivers: a missing SDK affects only its own
recordings.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TypeVar

DUMMY_KEY = "test-key-not-a-secret"
TIMEOUT = 30.0
"""Seconds any single replayed call may take (a safety net, never reached normally)."""

T = TypeVar("T")
Usage = dict[str, int]
Prepare = Callable[[Any], Any]
Transcript = list[Any]

VOLATILE_HEADERS = frozenset(
    {"date", "server", "content-length", "content-encoding", "transfer-encoding"}
)
"""Response headers left out of a transcript: the loopback server writes its own
``Date`` and ``Server``, and framing headers change when a body is decoded on the way
(the server sends recorded gzip bodies whatever ``Accept-Encoding`` asked for). Header
names are kept lower-cased: HTTP compares them so, and google-genai's async calls keep
the server's spelling through aiohttp but not through httpx (the guard sends them
through httpx)."""


@dataclass
class Run:
    """What one driver run gave the application."""

    usage: list[Usage] = field(default_factory=list)
    """Per SDK call, the token counts the SDK exposed."""
    transcript: Transcript = field(default_factory=list)
    """Every response object, chunk and event, in order, in JSON form."""


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json", exclude_none=True)
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj).decode("utf-8", "backslashreplace")
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return repr(obj)


def _scrub(obj: Any, in_headers: bool = False) -> Any:
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if in_headers:
                key = str(key).lower()
                if key in VOLATILE_HEADERS:
                    continue
            out[key] = _scrub(value, str(key).lower() in ("headers", "httpheaders"))
        return out
    if isinstance(obj, list):
        return [_scrub(value) for value in obj]
    return obj


def app_view(obj: Any) -> Any:
    """``obj`` as the application sees it, in JSON form, without volatile headers."""
    return _scrub(json.loads(json.dumps(obj, default=_jsonable)))


def same(client: T) -> T:
    """The default ``prepare``: the client unchanged."""
    return client


@dataclass(frozen=True)
class Call:
    """How to replay one recording through its SDK.

    Attributes:
        driver: the key of the driver in :data:`DRIVERS`.
        model: the model (or Bedrock model id / ARN) the SDK is asked for.
        calls: how many SDK calls to make (one per recorded exchange served).
        options: driver settings: ``api_version``, ``vertex``/``project``/``location``
            (google-genai), ``region`` (Bedrock), ``route`` (LiteLLM's provider prefix).
    """

    driver: str
    model: str
    calls: int = 1
    options: Mapping[str, str] = field(default_factory=dict)

    @property
    def sdk(self) -> str:
        """The driver family: ``genai``, ``bedrock``, ``mistral``, ``groq``, ``litellm``."""
        return self.driver.partition(".")[0]


def flatten_counts(obj: object, prefix: str = "") -> Usage:
    """The token counts in a JSON-like structure, as ``{"a.b.0.c": n}``.

    A token count is a leaf whose key names tokens (``prompt_token_count``,
    ``inputTokens``, ``header.input`` from a ``...-token-count`` header) and whose value
    is a whole number: an ``int``, or a float without a fraction (Bedrock's Titan stream
    chunks send ``6.0``).
    """
    out: Usage = {}
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            out.update(flatten_counts(value, f"{prefix}{key}."))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            out.update(flatten_counts(value, f"{prefix}{index}."))
    elif not isinstance(obj, bool) and isinstance(obj, (int, float)):
        key = prefix[:-1]
        last = key.rsplit(".", 1)[-1].lower()
        if "token" in last and (isinstance(obj, int) or obj.is_integer()):
            out[key] = int(obj)
    return out


def _dump(model: Any) -> Any:
    """A pydantic model (or mapping) as JSON-like data, extra fields included."""
    if model is None:
        return {}
    if hasattr(model, "model_dump"):
        return model.model_dump(mode="json", exclude_none=True)
    if isinstance(model, Mapping):
        return dict(model)
    return vars(model)


def _arun(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# ---------------------------------------------------------------------------------------
# google-genai (Gemini Developer API and Vertex AI)
# ---------------------------------------------------------------------------------------


def _genai_client(call: Call, url: str) -> Any:
    from google import genai
    from google.genai import types

    options = types.HttpOptions(
        base_url=url, api_version=call.options.get("api_version"), timeout=int(TIMEOUT * 1000)
    )
    if call.options.get("vertex"):
        from google.oauth2.credentials import Credentials

        return genai.Client(
            vertexai=True,
            project=call.options["project"],
            location=call.options["location"],
            credentials=Credentials(token=DUMMY_KEY),  # type: ignore[no-untyped-call]
            http_options=options,
        )
    return genai.Client(api_key=DUMMY_KEY, http_options=options)


def _genai_usage(responses: Sequence[Any]) -> Usage:
    """The usage of the last response that has one (a stream sends running totals)."""
    usage = None
    for response in responses:
        if response.usage_metadata is not None:
            usage = response.usage_metadata
    return flatten_counts(_dump(usage))


def genai_generate(call: Call, url: str, bodies: Sequence[bytes], prepare: Prepare) -> Run:
    client = prepare(_genai_client(call, url))
    run = Run()
    try:
        for _ in range(call.calls):
            response = client.models.generate_content(model=call.model, contents="Hi")
            run.transcript.append(app_view(response))
            run.usage.append(_genai_usage([response]))
        return run
    finally:
        client.close()


def genai_stream(call: Call, url: str, bodies: Sequence[bytes], prepare: Prepare) -> Run:
    client = prepare(_genai_client(call, url))
    run = Run()
    try:
        for _ in range(call.calls):
            chunks = list(client.models.generate_content_stream(model=call.model, contents="Hi"))
            run.transcript.extend(app_view(chunk) for chunk in chunks)
            run.usage.append(_genai_usage(chunks))
        return run
    finally:
        client.close()


def genai_agenerate(call: Call, url: str, bodies: Sequence[bytes], prepare: Prepare) -> Run:
    async def run() -> Run:
        client = prepare(_genai_client(call, url))
        out = Run()
        try:
            for _ in range(call.calls):
                response = await client.aio.models.generate_content(model=call.model, contents="Hi")
                out.transcript.append(app_view(response))
                out.usage.append(_genai_usage([response]))
            return out
        finally:
            await client.aio.aclose()
            client.close()

    return _arun(run())


def genai_astream(call: Call, url: str, bodies: Sequence[bytes], prepare: Prepare) -> Run:
    async def run() -> Run:
        client = prepare(_genai_client(call, url))
        out = Run()
        try:
            for _ in range(call.calls):
                stream = await client.aio.models.generate_content_stream(
                    model=call.model, contents="Hi"
                )
                chunks = [chunk async for chunk in stream]
                out.transcript.extend(app_view(chunk) for chunk in chunks)
                out.usage.append(_genai_usage(chunks))
            return out
        finally:
            await client.aio.aclose()
            client.close()

    return _arun(run())


# ---------------------------------------------------------------------------------------
# boto3 bedrock-runtime
# ---------------------------------------------------------------------------------------

_CONVERSE_MESSAGES = [{"role": "user", "content": [{"text": "Hi"}]}]

_BEDROCK_HEADERS = {
    "x-amzn-bedrock-input-token-count": "header.input",
    "x-amzn-bedrock-output-token-count": "header.output",
    "x-amzn-bedrock-cache-read-input-token-count": "header.cache_read",
    "x-amzn-bedrock-cache-write-input-token-count": "header.cache_write",
}


@cache
def _bedrock_session(region: str) -> Any:
    """One boto3 session per region, shared by the replays' clients.

    A new session loads botocore's service models again (about 60 ms a client); each
    client still gets its own endpoint, HTTP session and event hooks.
    """
    import boto3

    return boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key=DUMMY_KEY, region_name=region
    )


def _bedrock_client(call: Call, url: str) -> Any:
    from botocore.config import Config

    session = _bedrock_session(call.options.get("region", "us-east-1"))
    config = Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=TIMEOUT,
        read_timeout=TIMEOUT,
    )
    return session.client("bedrock-runtime", endpoint_url=url, config=config)


def _bedrock_header_counts(response: Mapping[str, Any]) -> Usage:
    headers = response["ResponseMetadata"]["HTTPHeaders"]
    return {key: int(headers[name]) for name, key in _BEDROCK_HEADERS.items() if name in headers}


def bedrock_converse(call: Call, url: str, bodies: Sequence[bytes], prepare: Prepare) -> Run:
    client = prepare(_bedrock_client(call, url))
    out = Run()
    for _ in range(call.calls):
        response = client.converse(modelId=call.model, messages=_CONVERSE_MESSAGES)
        out.transcript.append(app_view(response))
        out.usage.append(flatten_counts({"usage": response["usage"]}))
    return out


def bedrock_converse_stream(call: Call, url: str, bodies: Sequence[bytes], prepare: Prepare) -> Run:
    client = prepare(_bedrock_client(call, url))
    out = Run()
    for _ in range(call.calls):
        response = client.converse_stream(modelId=call.model, messages=_CONVERSE_MESSAGES)
        out.transcript.append(app_view({k: v for k, v in response.items() if k != "stream"}))
        usage: Usage = {}
        for event in response["stream"]:
            out.transcript.append(app_view(event))
            if "metadata" in event:
                usage = flatten_counts({"usage": event["metadata"]["usage"]})
        out.usage.append(usage)
    return out


def bedrock_invoke(call: Call, url: str, bodies: Sequence[bytes], prepare: Prepare) -> Run:
    client = prepare(_bedrock_client(call, url))
    out = Run()
    for body in bodies:
        response = client.invoke_model(
            modelId=call.model, body=body, contentType="application/json", accept="application/json"
        )
        data = response["body"].read()
        out.transcript.append(app_view({**response, "body": data}))
        usage = _bedrock_header_counts(response)
        usage.update(flatten_counts({"body": json.loads(data)}))
        out.usage.append(usage)
    return out


def bedrock_invoke_stream(call: Call, url: str, bodies: Sequence[bytes], prepare: Prepare) -> Run:
    client = prepare(_bedrock_client(call, url))
    out = Run()
    for body in bodies:
        response = client.invoke_model_with_response_stream(
            modelId=call.model, body=body, contentType="application/json", accept="application/json"
        )
        out.transcript.append(app_view({k: v for k, v in response.items() if k != "body"}))
        usage: Usage = {}
        for event in response["body"]:
            out.transcript.append(app_view(event))
            chunk = json.loads(event["chunk"]["bytes"])
            usage.update(flatten_counts({chunk.get("type", "chunk"): chunk}))
        out.usage.append(usage)
    return out


# ---------------------------------------------------------------------------------------
# mistralai
# ---------------------------------------------------------------------------------------

_MESSAGES = [{"role": "user", "content": "Hi"}]


def _mistral_client(url: str) -> Any:
    from mistralai.client import Mistral

    return Mistral(api_key=DUMMY_KEY, server_url=url, timeout_ms=int(TIMEOUT * 1000))


def _mistral_usage(usage: Any) -> Usage:
    return flatten_counts({"usage": _dump(usage)})


def mistral_complete(call: Call, url: str, bodies: Sequence[bytes], prepare: Prepare) -> Run:
    out = Run()
    with prepare(_mistral_client(url)) as client:
        for _ in range(call.calls):
            response = client.chat.complete(model=call.model, messages=_MESSAGES)
            out.transcript.append(app_view(response))
            out.usage.append(_mistral_usage(response.usage))
    return out


def mistral_acomplete(call: Call, url: str, bodies: Sequence[bytes], prepare: Prepare) -> Run:
    async def run() -> Run:
        out = Run()
        async with prepare(_mistral_client(url)) as client:
            for _ in range(call.calls):
                response = await client.chat.complete_async(model=call.model, messages=_MESSAGES)
                out.transcript.append(app_view(response))
                out.usage.append(_mistral_usage(response.usage))
        return out

    return _arun(run())


def mistral_stream(call: Call, url: str, bodies: Sequence[bytes], prepare: Prepare) -> Run:
    out = Run()
    with prepare(_mistral_client(url)) as client:
        for _ in range(call.calls):
            usage: Usage = {}
            for event in client.chat.stream(model=call.model, messages=_MESSAGES):
                out.transcript.append(app_view(event))
                if event.data.usage is not None:
                    usage = _mistral_usage(event.data.usage)
            out.usage.append(usage)
    return out


def mistral_embed(call: Call, url: str, bodies: Sequence[bytes], prepare: Prepare) -> Run:
    out = Run()
    with prepare(_mistral_client(url)) as client:
        for _ in range(call.calls):
            response = client.embeddings.create(model=call.model, inputs="Hi")
            out.transcript.append(app_view(response))
            out.usage.append(_mistral_usage(response.usage))
    return out


# ---------------------------------------------------------------------------------------
# groq
# ---------------------------------------------------------------------------------------


def _groq_client(url: str) -> Any:
    from groq import Groq

    return Groq(api_key=DUMMY_KEY, base_url=url, max_retries=0, timeout=TIMEOUT)


def groq_create(call: Call, url: str, bodies: Sequence[bytes], prepare: Prepare) -> Run:
    out = Run()
    with prepare(_groq_client(url)) as client:
        for _ in range(call.calls):
            response = client.chat.completions.create(model=call.model, messages=_MESSAGES)
            out.transcript.append(app_view(response))
            out.usage.append(flatten_counts({"usage": _dump(response.usage)}))
    return out


def groq_stream(call: Call, url: str, bodies: Sequence[bytes], prepare: Prepare) -> Run:
    out = Run()
    with prepare(_groq_client(url)) as client:
        for _ in range(call.calls):
            usage: Usage = {}
            stream = client.chat.completions.create(
                model=call.model, messages=_MESSAGES, stream=True
            )
            for chunk in stream:
                out.transcript.append(app_view(chunk))
                x_groq = chunk.x_groq
                if x_groq is not None and x_groq.usage is not None:
                    usage = flatten_counts({"x_groq": {"usage": _dump(x_groq.usage)}})
            out.usage.append(usage)
    return out


# ---------------------------------------------------------------------------------------
# litellm
# ---------------------------------------------------------------------------------------

_LITELLM_BASES = {"openai": "/v1", "gemini": "/v1beta"}


def _litellm_kwargs(call: Call, url: str) -> dict[str, Any]:
    route = call.options.get("route", "openai")
    return {
        "model": f"{route}/{call.model}",
        "messages": _MESSAGES,
        "api_base": url + _LITELLM_BASES[route],
        "api_key": DUMMY_KEY,
        "num_retries": 0,
        "max_retries": 0,
        "timeout": TIMEOUT,
    }


LITELLM_MADE_UP = frozenset({"id", "created"})
"""Fields LiteLLM makes up per call where the provider sent none (a fresh id, the clock)."""


def _litellm_view(response: Any) -> Any:
    view = app_view(response)
    if isinstance(view, dict):
        for key in LITELLM_MADE_UP:
            view.pop(key, None)
    return view


def _litellm_usage(response: Any) -> Usage:
    return flatten_counts({"usage": _dump(getattr(response, "usage", None))})


def litellm_completion(call: Call, url: str, bodies: Sequence[bytes], prepare: Prepare) -> Run:
    import litellm

    out = Run()
    for _ in range(call.calls):
        response = litellm.completion(**_litellm_kwargs(call, url))
        out.transcript.append(_litellm_view(response))
        out.usage.append(_litellm_usage(response))
    return out


def litellm_acompletion(call: Call, url: str, bodies: Sequence[bytes], prepare: Prepare) -> Run:
    import litellm

    async def run() -> Run:
        out = Run()
        for _ in range(call.calls):
            response = await litellm.acompletion(**_litellm_kwargs(call, url))
            out.transcript.append(_litellm_view(response))
            out.usage.append(_litellm_usage(response))
        return out

    return _arun(run())


def litellm_astream(call: Call, url: str, bodies: Sequence[bytes], prepare: Prepare) -> Run:
    import litellm

    async def run() -> Run:
        out = Run()
        for _ in range(call.calls):
            stream = await litellm.acompletion(
                **_litellm_kwargs(call, url), stream=True, stream_options={"include_usage": True}
            )
            usage: Usage = {}
            async for chunk in stream:
                out.transcript.append(_litellm_view(chunk))
                if getattr(chunk, "usage", None) is not None:
                    usage = _litellm_usage(chunk)
            out.usage.append(usage)
        return out

    return _arun(run())


Driver = Callable[[Call, str, Sequence[bytes], Prepare], Run]

DRIVERS: dict[str, Driver] = {
    "genai.generate": genai_generate,
    "genai.stream": genai_stream,
    "genai.agenerate": genai_agenerate,
    "genai.astream": genai_astream,
    "bedrock.converse": bedrock_converse,
    "bedrock.converse_stream": bedrock_converse_stream,
    "bedrock.invoke": bedrock_invoke,
    "bedrock.invoke_stream": bedrock_invoke_stream,
    "mistral.complete": mistral_complete,
    "mistral.acomplete": mistral_acomplete,
    "mistral.stream": mistral_stream,
    "mistral.embed": mistral_embed,
    "groq.create": groq_create,
    "groq.stream": groq_stream,
    "litellm.completion": litellm_completion,
    "litellm.acompletion": litellm_acompletion,
    "litellm.astream": litellm_astream,
}

SDK_MODULES = {
    "genai": "google.genai",
    "bedrock": "boto3",
    "mistral": "mistralai.client",
    "groq": "groq",
    "litellm": "litellm",
}
"""The module each driver family needs (the recordings of a missing SDK are skipped)."""
