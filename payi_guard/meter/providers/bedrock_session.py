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
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from payi_guard.context import get_context
from payi_guard.engine import CallRequest, Guard
from payi_guard.exceptions import (
    BudgetExceeded,
    PayiGuardError,
    StorageError,
    UnknownModelRefused,
)
from payi_guard.meter.options import MeterOptions
from payi_guard.meter.parse import ParsedUsage
from payi_guard.meter.providers.eventstream import EventMessage, EventStreamDecoder
from payi_guard.meter.providers.hooks import Patches
from payi_guard.meter.providers.meter import Dialect, WireStreamState, media_type, split_path
from payi_guard.meter.providers.wire import (
    Bound,
    JsonBodyTracker,
    Report,
    UntrustedUsage,
    WireEndpoint,
    WireRequest,
    WireTracker,
    count,
    first_cap,
    model_cap,
)
from payi_guard.meter.streams import DECODABLE_ENCODINGS, _Inflater, _settle_finalizer
from payi_guard.meter.tokens import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    EndpointKind,
    EstimateMode,
    image_token_bound,
    model_output_cap,
)
from payi_guard.meter.transport import UNKNOWN_MODEL

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

PROVIDER: Final = "aws"
SERVICE: Final = "bedrock-runtime"

_OPERATIONS: Final = {
    "converse": False,
    "converse-stream": True,
    "invoke": False,
    "invoke-with-response-stream": True,
}

_REGION_PREFIXES: Final = ("us.", "eu.", "apac.", "jp.", "au.", "ca.", "us-gov.", "global.")

_OUTPUT_CAPS: Final = (
    ("nova-premier", 32_000),
    ("nova", 10_000),
    ("llama4", 8_192),
    ("llama3", 2_048),
    ("llama2", 2_048),
    ("titan-text-express", 8_192),
    ("titan-text-lite", 4_096),
    ("titan-text-premier", 3_072),
    ("mistral", 8_192),
    ("mixtral", 4_096),
    ("pixtral", 8_192),
    ("command", 4_096),
    ("jamba", 4_096),
    ("deepseek", 32_768),
    ("gpt-oss", 32_768),
    ("qwen", 32_768),
)
"""Output caps of non-Claude families by model-id fragment (Claude: the shared table)."""

_OUTPUT_FIELDS: Final = (
    "max_tokens",
    "max_completion_tokens",
    "max_gen_len",
    "max_new_tokens",
    "maxTokens",
    "maxTokenCount",
    "max_tokens_to_sample",
    "inferenceConfig.max_new_tokens",
    "inferenceConfig.maxTokens",
    "textGenerationConfig.maxTokenCount",
)
"""Where an ``invoke`` body of any family sets its output cap."""

_HEADERS: Final = {
    "input": "x-amzn-bedrock-input-token-count",
    "output": "x-amzn-bedrock-output-token-count",
    "cache_read": "x-amzn-bedrock-cache-read-input-token-count",
    "cache_write": "x-amzn-bedrock-cache-write-input-token-count",
}


# ---------------------------------------------------------------------------------------
# The wire
# ---------------------------------------------------------------------------------------


def base_model(model_id: str) -> str:
    """The model a Bedrock id names: ARN, region prefix and vendor stripped.

    ``arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-3-5-haiku-20241022-v1:0``
    and ``us.anthropic.claude-3-5-haiku-20241022-v1:0`` both give
    ``claude-3-5-haiku-20241022-v1:0`` (for output caps and image allowances; prices
    are resolved from the id itself).
    """
    name = model_id.rsplit("/", 1)[-1] if model_id.startswith("arn:") else model_id
    for prefix in _REGION_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    vendor, dot, rest = name.partition(".")
    return rest if dot and vendor.isalpha() else name


def _media(block: Mapping[str, Any]) -> str | None:
    """``image`` / ``file`` for a media block, else ``None``.

    Converse's ``{"image": ...}`` / ``{"document"|"video": ...}`` blocks and Anthropic's
    ``{"type": "image"|"document"}`` blocks.
    """
    if isinstance(block.get("image"), Mapping) or block.get("type") == "image":
        return "image"
    if isinstance(block.get("document"), Mapping) or isinstance(block.get("video"), Mapping):
        return "file"
    if block.get("type") == "document":
        return "file"
    return None


def _mentions(obj: object, key: str) -> bool:
    if isinstance(obj, Mapping):
        return key in obj or any(_mentions(value, key) for value in obj.values())
    if isinstance(obj, list):
        return any(_mentions(value, key) for value in obj)
    return False


def converse_usage(usage: Mapping[str, Any]) -> ParsedUsage:
    """Read a Converse ``usage`` object (``inputTokens`` excludes the cache counts).

    Raises:
        UntrustedUsage: a count is missing, negative or not a whole number.
    """
    return ParsedUsage(
        input_tokens=count(usage, "inputTokens"),
        output_tokens=count(usage, "outputTokens"),
        cache_read_tokens=count(usage, "cacheReadInputTokens", default=0),
        cache_write_tokens=count(usage, "cacheWriteInputTokens", default=0),
        complete=True,
    )


def metrics_usage(metrics: Mapping[str, Any]) -> ParsedUsage:
    """Read ``amazon-bedrock-invocationMetrics`` (the last chunk of a response stream)."""
    return ParsedUsage(
        input_tokens=count(metrics, "inputTokenCount"),
        output_tokens=count(metrics, "outputTokenCount"),
        cache_read_tokens=count(metrics, "cacheReadInputTokenCount", default=0),
        cache_write_tokens=count(metrics, "cacheWriteInputTokenCount", default=0),
        complete=True,
    )


def header_report(headers: Mapping[str, str] | Any) -> Report | None:
    """The usage of the ``X-Amzn-Bedrock-*-Token-Count`` headers, if the response has them."""
    if headers.get(_HEADERS["input"]) is None and headers.get(_HEADERS["output"]) is None:
        return None
    values: dict[str, Any] = {}
    for key, name in _HEADERS.items():
        raw = headers.get(name)
        if raw is None:
            continue
        text = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)
        values[key] = int(text) if text.strip().isdigit() else text
    return Report.read(
        lambda: ParsedUsage(
            input_tokens=count(values, "input"),
            output_tokens=count(values, "output"),
            cache_read_tokens=count(values, "cache_read", default=0),
            cache_write_tokens=count(values, "cache_write", default=0),
            complete=True,
        )
    )


def family_usage(body: Mapping[str, Any]) -> ParsedUsage:
    """The usage a model family writes in its own ``invoke`` body.

    Anthropic (``usage.input_tokens``...), Nova (``usage.inputTokens``...), Titan
    (``inputTextTokenCount`` and the results' ``tokenCount``, or a stream chunk's
    ``totalOutputTextTokenCount``), Meta (``prompt_token_count``,
    ``generation_token_count``), OpenAI-style (``usage.prompt_tokens``...).

    Raises:
        UntrustedUsage: none of these is there, or a count cannot be trusted.
    """
    usage = body.get("usage")
    if isinstance(usage, Mapping):
        if "input_tokens" in usage:
            return ParsedUsage(
                input_tokens=count(usage, "input_tokens"),
                output_tokens=count(usage, "output_tokens"),
                cache_read_tokens=count(usage, "cache_read_input_tokens", default=0),
                cache_write_tokens=count(usage, "cache_creation_input_tokens", default=0),
                complete=True,
            )
        if "inputTokens" in usage:
            return ParsedUsage(
                input_tokens=count(usage, "inputTokens"),
                output_tokens=count(usage, "outputTokens"),
                cache_read_tokens=count(usage, "cacheReadInputTokenCount", default=0),
                cache_write_tokens=count(usage, "cacheWriteInputTokenCount", default=0),
                complete=True,
            )
        if "prompt_tokens" in usage:
            cached = 0
            details = usage.get("prompt_tokens_details")
            if isinstance(details, Mapping):
                cached = count(details, "cached_tokens", default=0)
            prompt = count(usage, "prompt_tokens")
            return ParsedUsage(
                input_tokens=max(0, prompt - cached),
                output_tokens=count(usage, "completion_tokens"),
                cache_read_tokens=min(cached, prompt),
                complete=True,
            )
    if "inputTextTokenCount" in body:
        if "totalOutputTextTokenCount" in body:
            output = count(body, "totalOutputTextTokenCount")
        else:
            results = body.get("results")
            if not isinstance(results, list) or not results:
                raise UntrustedUsage("Titan results are missing")
            output = sum(count(r, "tokenCount") for r in results if isinstance(r, Mapping))
        return ParsedUsage(
            input_tokens=count(body, "inputTextTokenCount"), output_tokens=output, complete=True
        )
    if "prompt_token_count" in body:
        return ParsedUsage(
            input_tokens=count(body, "prompt_token_count"),
            output_tokens=count(body, "generation_token_count"),
            complete=True,
        )
    raise UntrustedUsage("the response reports no token counts")


def _converse_body_report(obj: Any) -> Report:
    usage = obj.get("usage") if isinstance(obj, Mapping) else None
    if not isinstance(usage, Mapping):
        return Report(invalid="the Converse response has no usage")
    return Report.read(lambda: converse_usage(usage))


def _invoke_body_report(obj: Any) -> Report:
    if not isinstance(obj, Mapping):
        return Report(invalid="the response body is not JSON")
    return Report.read(lambda: family_usage(obj))


class EventStreamTracker(WireTracker):
    """An ``application/vnd.amazon.eventstream`` body: :meth:`on_message` per message."""

    def __init__(self) -> None:
        super().__init__()
        self._decoder = EventStreamDecoder()

    def feed(self, chunk: bytes) -> None:
        """Decode the messages ``chunk`` completes."""
        for message in self._decoder.feed(chunk):
            if message.message_type not in (None, "event"):
                self.errors.append(message.exception_type or message.message_type or "error")
                continue
            try:
                payload: Any = json.loads(message.payload) if message.payload else {}
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(payload, dict):
                self.on_message(message, payload)

    def finish(self) -> None:
        """The body ended."""
        self.on_end()

    def on_message(self, message: EventMessage, payload: dict[str, Any]) -> None:
        """Read one event's JSON payload."""

    def on_end(self) -> None:
        """The stream ended."""
        if self.report is None and self._decoder.broken is not None:
            self.report = Report(
                invalid=f"the event stream cannot be decoded: {self._decoder.broken}"
            )


class ConverseStream(EventStreamTracker):
    """``converse-stream``: text deltas, then ``messageStop``, then ``metadata`` with usage."""

    def on_message(self, message: EventMessage, payload: dict[str, Any]) -> None:
        """Read one Converse stream event."""
        kind = message.event_type
        if kind == "contentBlockDelta":
            delta = payload.get("delta")
            if isinstance(delta, Mapping):
                self.count_text(delta.get("text"))
                for key in ("toolUse", "reasoningContent"):
                    inner = delta.get(key)
                    if isinstance(inner, Mapping):
                        self.count_text(inner.get("input") or inner.get("text"))
        elif kind == "messageStop":
            self.finished = True
        elif kind == "metadata":
            usage = payload.get("usage")
            if isinstance(usage, Mapping):
                self.report = Report.read(lambda: converse_usage(usage))
            else:
                self.report = Report(invalid="the metadata event has no usage")


_CHUNK_TEXT: Final = ("outputText", "generation", "completion", "text")


class InvokeStream(EventStreamTracker):
    """``invoke-with-response-stream``: base64 JSON chunks of the model family's format."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, Any] | None = None

    def on_message(self, message: EventMessage, payload: dict[str, Any]) -> None:
        """Decode one ``chunk`` and read its counts and text."""
        encoded = payload.get("bytes")
        if message.event_type != "chunk" or not isinstance(encoded, str):
            return
        try:
            chunk: Any = json.loads(base64.b64decode(encoded))
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return
        if not isinstance(chunk, dict):
            return
        self._last = chunk
        self._count(chunk)
        metrics = chunk.get("amazon-bedrock-invocationMetrics")
        if isinstance(metrics, Mapping):
            self.report = Report.read(lambda: metrics_usage(metrics))
            return
        kind = chunk.get("type")
        if kind == "message_start":
            inner = chunk.get("message")
            usage = inner.get("usage") if isinstance(inner, Mapping) else None
            if isinstance(usage, Mapping):
                self.partial = ParsedUsage(
                    input_tokens=_safe(usage, "input_tokens"),
                    cache_read_tokens=_safe(usage, "cache_read_input_tokens"),
                    cache_write_tokens=_safe(usage, "cache_creation_input_tokens"),
                )

    def _count(self, chunk: Mapping[str, Any]) -> None:
        delta = chunk.get("delta")
        if isinstance(delta, Mapping):  # Anthropic
            self.count_text(delta.get("text") or delta.get("partial_json") or delta.get("thinking"))
        for key in _CHUNK_TEXT:
            self.count_text(chunk.get(key))
        block = chunk.get("contentBlockDelta")  # Nova
        if isinstance(block, Mapping) and isinstance(block.get("delta"), Mapping):
            self.count_text(block["delta"].get("text"))
        for item in chunk.get("outputs") or chunk.get("choices") or ():  # Mistral
            if isinstance(item, Mapping):
                self.count_text(item.get("text"))
                for key in ("delta", "message"):
                    inner = item.get(key)
                    if isinstance(inner, Mapping):
                        self.count_text(inner.get("content"))

    def on_end(self) -> None:
        """Without invocation metrics, the family's counts in the last chunk."""
        super().on_end()
        last = self._last
        if self.report is None and last is not None:
            self.report = Report.read(lambda: family_usage(last))


def _safe(obj: Mapping[str, Any], key: str) -> int:
    try:
        return count(obj, key, default=0)
    except UntrustedUsage:
        return 0


def _signed_for_bedrock(headers: Any) -> bool:
    """Whether a request carries a SigV4 signature scoped to the ``bedrock`` service."""
    if headers is None:
        return False
    value = headers.get("authorization") or ""
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return text.startswith("AWS4-HMAC-SHA256") and "/bedrock/aws4_request" in text


class BedrockDialect(Dialect):
    """The Bedrock runtime wire format.

    Args:
        any_host: answer for any host (botocore's own endpoint, whatever
            ``endpoint_url`` says); otherwise only for ``bedrock-runtime`` hosts
            (LiteLLM's clients are shared by every provider).
    """

    provider = PROVIDER
    signed = True

    def __init__(self, *, any_host: bool = True) -> None:
        self.any_host = any_host

    def classify(
        self, method: str, host: str, path: list[str], headers: Any = None
    ) -> WireEndpoint | None:
        """``POST /model/{modelId}/{operation}`` of a metered operation.

        Without ``any_host``, the request must go to a ``bedrock-runtime`` host or be
        signed for the ``bedrock`` service (a custom or VPC endpoint).
        """
        if method != "POST" or len(path) != 3 or path[0] != "model":
            return None
        if not self.any_host and SERVICE not in host and not _signed_for_bedrock(headers):
            return None
        model, operation = path[1], path[2]
        if operation not in _OPERATIONS or not model:
            return None
        kind: EndpointKind = "embeddings" if "embed" in base_model(model).lower() else "chat"
        return WireEndpoint(kind, operation, model, _OPERATIONS[operation])

    def describe(
        self, endpoint: WireEndpoint, body: Mapping[str, Any], mode: EstimateMode
    ) -> WireRequest:
        """The bounds of a Converse body or of a model family's ``invoke`` body."""
        model = endpoint.model or UNKNOWN_MODEL
        base = base_model(model)
        bound = Bound(image_tokens=image_token_bound(base), media=_media)
        if endpoint.operation.startswith("converse"):
            bound.add_items(body.get("messages"))
            for key in ("system", "toolConfig", "outputConfig", "additionalModelRequestFields"):
                bound.add(body.get(key))
            cap = first_cap(body, "inferenceConfig.maxTokens")
            cache_writes = _mentions(body, "cachePoint")
        else:
            bound.add_items(body.get("messages"))
            bound.add({k: v for k, v in body.items() if k != "messages"})
            cap = first_cap(body, *_OUTPUT_FIELDS)
            cache_writes = _mentions(body, "cache_control") or _mentions(body, "cachePoint")
        if endpoint.kind == "embeddings":
            cap = 0
        elif cap is None:
            cap = _model_cap(base)
        return WireRequest(
            model, bool(endpoint.stream), bound.tokens(mode), cap, cache_writes=cache_writes
        )

    def tracker(
        self, endpoint: WireEndpoint, content_type: str, headers: Mapping[str, str] | Any
    ) -> WireTracker:
        """The tracker of each operation's response."""
        operation = endpoint.operation
        if operation == "converse-stream":
            return ConverseStream()
        if operation == "invoke-with-response-stream":
            return InvokeStream()
        if operation == "converse":
            return JsonBodyTracker(_converse_body_report)
        return JsonBodyTracker(_invoke_body_report, header_report(headers))


def _model_cap(base: str) -> int:
    if base.lower().startswith("claude"):
        return model_output_cap(base)
    return model_cap(base, _OUTPUT_CAPS, DEFAULT_MAX_OUTPUT_TOKENS)


DIALECT: Final = BedrockDialect()


# ---------------------------------------------------------------------------------------
# botocore: the guarded HTTP session
# ---------------------------------------------------------------------------------------

_ERROR_CODES: Final = (
    (BudgetExceeded, "ThrottlingException", 429),
    (UnknownModelRefused, "AccessDeniedException", 403),
    (StorageError, "ServiceUnavailableException", 503),
)


def refusal(exceptions: Any, exc: PayiGuardError, operation: str) -> BaseException:
    """The client's modeled exception that is also the payi_guard refusal.

    Args:
        exceptions: the client's ``client.exceptions``.
        exc: the refusal.
        operation: the operation name (``Converse``...), for the error message.
    """
    from botocore.exceptions import ClientError

    code, status = "ValidationException", 400
    for cls, name, http_status in _ERROR_CODES:
        if isinstance(exc, cls):
            code, status = name, http_status
            break
    message = exc.describe() if isinstance(exc, BudgetExceeded) else str(exc)
    error_response = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": {}, "RetryAttempts": 0},
    }
    sdk_class = getattr(exceptions, code, None) or ClientError
    error = sdk_class(error_response, operation)
    combined: BaseException = type(error).__new__(_combined(type(error), type(exc)), *error.args)
    combined.__dict__.update(exc.__dict__)
    combined.__dict__.update(error.__dict__)
    return combined


_PUBLIC_MODULE: Final = "payi_guard.meter.providers.bedrock"
"""The module the refusal classes name: the one applications import, wherever they are made."""

_combined_lock = threading.Lock()
_combined_classes: weakref.WeakValueDictionary[tuple[type[Any], type[Any]], type[Any]]
_combined_classes = weakref.WeakValueDictionary()


def _combined(sdk_class: type[BaseException], refusal_class: type[PayiGuardError]) -> type[Any]:
    # botocore makes a modeled exception class per client class: kept weakly, so that
    # a discarded client's classes can go.
    key = (sdk_class, refusal_class)
    with _combined_lock:
        cls = _combined_classes.get(key)
        if cls is None:
            name = f"{refusal_class.__name__}As{sdk_class.__name__}"
            cls = type(
                name,
                (sdk_class, refusal_class),
                {"__module__": _PUBLIC_MODULE, "__qualname__": name},
            )
            _combined_classes[key] = cls
        return cls


_OPERATION_NAMES: Final = {
    "converse": "Converse",
    "converse-stream": "ConverseStream",
    "invoke": "InvokeModel",
    "invoke-with-response-stream": "InvokeModelWithResponseStream",
}


@dataclass(frozen=True, slots=True)
class _Planned:
    endpoint: WireEndpoint
    call: CallRequest


class MeteredRaw:
    """A botocore response's ``raw`` body, read through while its usage is tracked.

    botocore reads an event stream with :meth:`stream`, a JSON body through ``content``
    (also :meth:`stream`) and an ``invoke_model`` body with :meth:`read` /
    :meth:`readinto`. The bytes are handed on unchanged; the reservation is settled at
    the body's end, at :meth:`close`, on a read error, or when the object is collected.
    """

    def __init__(self, raw: Any, state: WireStreamState) -> None:
        self._raw = raw
        self._state = state
        self._finalizer = _settle_finalizer(self, state)
        self._ended = False

    def preloaded(self, content: bytes) -> None:
        """Meter a body read before it was wrapped.

        botocore reads every body that does not stream inside its session.
        """
        self._state.feed(content)
        self._end()

    def _settle(self, reason: str) -> None:
        self._finalizer.detach()
        self._state.settle(reason)

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._state.end()
            self._settle("end")

    def stream(self, amt: int = 2**16, decode_content: bool | None = None) -> Iterator[bytes]:
        """The body in chunks, as urllib3's ``stream``."""
        state = self._state
        try:
            for chunk in self._raw.stream(amt, decode_content=decode_content):
                state.feed(chunk)
                yield chunk
        except Exception:
            self._settle("error")
            raise
        self._end()

    def read(self, amt: int | None = None, *args: Any, **kwargs: Any) -> bytes:
        """Read like urllib3's ``read``."""
        try:
            data: bytes = self._raw.read(amt, *args, **kwargs)
        except Exception:
            self._settle("error")
            raise
        if data:
            self._state.feed(data)
        if amt is None or not data:
            self._end()
        return data

    def readinto(self, buffer: Any) -> int:
        """Read into ``buffer`` like urllib3's ``readinto``."""
        try:
            size: int = self._raw.readinto(buffer)
        except Exception:
            self._settle("error")
            raise
        if size:
            self._state.feed(bytes(memoryview(buffer)[:size]))
        elif len(buffer):
            self._end()
        return size

    def readlines(self) -> list[bytes]:
        """The rest of the body, split into lines."""
        return self.read().splitlines(keepends=True)

    def close(self) -> None:
        """Close the body; a body not read to its end is settled as cut short."""
        try:
            self._raw.close()
        finally:
            self._settle("close")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class GuardedSession:
    """botocore's HTTP session for one client, guarding its Bedrock calls.

    Args:
        inner: the session botocore built (a ``URLLib3Session``).
        guard: the guard.
        options: the options of the ``wrap`` / ``instrument`` call.
        exceptions: the client's ``client.exceptions`` (refusals are raised as them).
    """

    def __init__(self, inner: Any, guard: Guard, options: MeterOptions, exceptions: Any) -> None:
        self.inner = inner
        self.guard = guard
        self.options = options
        self._exceptions = exceptions

    def _plan(self, request: Any) -> _Planned | None:
        from urllib.parse import urlsplit

        url = urlsplit(str(request.url))
        endpoint = DIALECT.classify(
            str(request.method).upper(), (url.hostname or "").lower(), split_path(url.path)
        )
        body = request.body
        if endpoint is None or not isinstance(body, (bytes, bytearray)):
            return None
        try:
            parsed: Any = json.loads(body) if body else {}
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(parsed, dict):
            return None
        wire = DIALECT.describe(endpoint, parsed, self.options.estimate_mode)
        call = CallRequest(
            model=wire.model or UNKNOWN_MODEL,
            provider=self.options.provider or PROVIDER,
            endpoint=endpoint.kind,
            input_tokens=wire.input_tokens,
            max_output_tokens=wire.output_tokens,
            stream=wire.stream,
            cache_writes=wire.cache_writes,
        )
        return _Planned(endpoint, call)

    def send(self, request: Any) -> Any:
        """Send one attempt: reserve, send, wrap the body (or refuse, or release)."""
        planned = self._plan(request)
        if planned is None:
            return self.inner.send(request)
        try:
            reservation = self.guard.begin(planned.call, get_context())
        except PayiGuardError as exc:
            operation = _OPERATION_NAMES[planned.endpoint.operation]
            raise refusal(self._exceptions, exc, operation) from None
        try:
            response = self.inner.send(request)
        except BaseException:
            reservation.release(outcome="error")
            raise
        if not 200 <= int(response.status_code) < 300:
            reservation.release(outcome="error")
            return response
        headers = response.headers
        encoding = str(headers.get("content-encoding") or "").strip().lower()
        inflater = None
        if encoding in DECODABLE_ENCODINGS:
            inflater = _Inflater("deflate" if encoding == "deflate" else "gzip")
        tracker = DIALECT.tracker(planned.endpoint, media_type(headers), headers)
        state = WireStreamState(
            reservation,
            tracker,
            fallback_input=planned.call.input_tokens,
            max_output=planned.call.max_output_tokens,
            inflater=inflater,
            raw=bool(encoding) and encoding != "identity" and inflater is None,
            forward_decoded=False,
        )
        raw = MeteredRaw(response.raw, state)
        response.raw = raw
        content = getattr(response, "_content", None)
        if isinstance(content, bytes):
            raw.preloaded(content)
        return response

    def close(self) -> None:
        """Close the inner session."""
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


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
