"""The Bedrock runtime wire format (:class:`BedrockDialect`): what is metered, and its bounds.

The model is in the URL, ``/model/{modelId}/{operation}`` (a model id, a cross-region
inference profile or an ARN); the bound is every text of the body, an allowance per
image, document or video, and the output cap the body sets (Converse's or the model
family's field), else the model's. Each operation's response is read by a tracker of
:mod:`~payi_guard.meter.providers.bedrock_streams` or a JSON body read with
:mod:`~payi_guard.meter.providers.bedrock_usage`. Pure: botocore is not needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, Final

from payi_guard.meter.providers.bedrock_streams import ConverseStream, InvokeStream
from payi_guard.meter.providers.bedrock_usage import (
    converse_usage,
    family_usage,
    header_report,
    with_1h_writes,
)
from payi_guard.meter.providers.meter import Dialect
from payi_guard.meter.providers.wire import (
    Bound,
    JsonBodyTracker,
    Report,
    WireEndpoint,
    WireRequest,
    WireTracker,
    first_cap,
    model_cap,
)
from payi_guard.meter.tokens import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    EndpointKind,
    EstimateMode,
    image_token_bound,
    model_output_cap,
)
from payi_guard.meter.transport import UNKNOWN_MODEL

__all__ = ["DIALECT", "PROVIDER", "SERVICE", "BedrockDialect", "base_model"]

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


def _converse_body_report(obj: Any) -> Report:
    usage = obj.get("usage") if isinstance(obj, Mapping) else None
    if not isinstance(usage, Mapping):
        return Report(invalid="the Converse response has no usage")
    return Report.read(lambda: converse_usage(usage))


def _invoke_body_report(obj: Any) -> Report:
    if not isinstance(obj, Mapping):
        return Report(invalid="the response body is not JSON")
    return Report.read(lambda: family_usage(obj))


def _headed_body_report(headers: Report, obj: Any) -> Report:
    """The headers' counts, with the 1-hour cache writes the body tells apart.

    The ``X-Amzn-Bedrock-*`` headers give one cache-write total; an Anthropic body's
    ``cache_creation`` says how much of it has a 1-hour lifetime.
    """
    usage = headers.usage
    body = _invoke_body_report(obj).usage
    if usage is None or body is None or not body.cache_write_1h_tokens:
        return headers
    return Report(usage=with_1h_writes(usage, body.cache_write_1h_tokens))


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
        headed = header_report(headers, output=endpoint.kind != "embeddings")
        if headed is not None and headed.usage is not None and headed.usage.cache_write_tokens:
            # The body may split the cache writes by lifetime: read it too.
            return JsonBodyTracker(partial(_headed_body_report, headed))
        return JsonBodyTracker(_invoke_body_report, headed)


def _model_cap(base: str) -> int:
    if base.lower().startswith("claude"):
        return model_output_cap(base)
    return model_cap(base, _OUTPUT_CAPS, DEFAULT_MAX_OUTPUT_TOKENS)


DIALECT: Final = BedrockDialect()
