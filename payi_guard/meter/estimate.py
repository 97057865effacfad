"""What a request reserves: its token bounds and price facts, and their upper-bound cost.

:func:`estimate_request` reads a request body once for everything a reservation needs:
the token bounds of :mod:`payi_guard.meter.tokens`, whether the prompt cache may be
written, and the price variant it asks for. The guarding transport reserves exactly that
(as a :class:`~payi_guard.engine.CallRequest`), and the guard prices it with
:meth:`~payi_guard.pricing.Rates.upper_bound_nano`; :func:`estimate_cost` does the same
pricing in one call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from payi_guard.meter.server_tools import file_search_bound, tool_input_tokens, web_search_bound
from payi_guard.meter.tier import tier_context
from payi_guard.meter.tokens import (
    DEFAULT_FILE_TOKENS,
    DEFAULT_MAX_OUTPUT_TOKENS,
    ENDPOINTS,
    EndpointKind,
    EstimateMode,
    check_bound_args,
    image_token_bound,
    input_bound,
    output_bound,
    request_output_cap,
)
from payi_guard.pricing import PriceBook, Rates

__all__ = [
    "Estimate",
    "RequestBounds",
    "RequestEstimate",
    "estimate_cost",
    "estimate_request",
    "request_bounds",
]


def _price_context(body: Mapping[str, Any], endpoint: EndpointKind) -> dict[str, str]:
    """The tier a request asks for, as a price context (empty: the standard tier)."""
    if endpoint == "anthropic_messages":
        asked = tier_context("speed", body.get("speed"))
    else:
        asked = tier_context("service_tier", body.get("service_tier"))
    return dict(asked) if asked else {}


def _mentions_key(obj: object, key: str) -> bool:
    if isinstance(obj, Mapping):
        return key in obj or any(_mentions_key(v, key) for v in obj.values())
    if isinstance(obj, list):
        return any(_mentions_key(v, key) for v in obj)
    return False


@dataclass(frozen=True, slots=True)
class Estimate:
    """An upper bound of one request's cost.

    Attributes:
        input_tokens: upper bound of all input tokens.
        output_tokens: upper bound of the output tokens (every choice).
        nano: upper bound of the cost in nano-USD, to reserve.
        rates: the rates it was priced with.
    """

    input_tokens: int
    output_tokens: int
    nano: int
    rates: Rates


@dataclass(frozen=True, slots=True)
class RequestEstimate:
    """What a request body bounds before any price is applied.

    Attributes:
        input_tokens: upper bound of all input tokens.
        output_tokens: upper bound of the output tokens (every choice).
        cache_writes: whether the call may write the prompt cache (then cache-write
            rates bound the input price): always on OpenAI, which caches by itself; on
            Anthropic only when the body asks for it with ``cache_control``.
        price_context: the request facts that select a price variant: the tier it
            asks for (``service_tier`` other than ``auto`` and the standard tier;
            Anthropic's ``speed`` other than ``standard``:
            :func:`~payi_guard.meter.tier.tier_context`).
        web_searches: upper bound of the server-side web searches
            (:func:`~payi_guard.meter.server_tools.web_search_bound`).
        file_searches: upper bound of the server-side file search calls
            (:func:`~payi_guard.meter.server_tools.file_search_bound`).
    """

    input_tokens: int
    output_tokens: int
    cache_writes: bool
    price_context: Mapping[str, str]
    web_searches: int = 0
    file_searches: int = 0


def estimate_request(
    body: Mapping[str, Any],
    endpoint: EndpointKind,
    model: str,
    *,
    mode: EstimateMode = "ratio",
    default_max_output: int = DEFAULT_MAX_OUTPUT_TOKENS,
    image_tokens: int | None = None,
    file_tokens: int = DEFAULT_FILE_TOKENS,
) -> RequestEstimate:
    """Bound a request from its body: what the guarding transport reserves for.

    Args:
        body: the parsed JSON request body.
        endpoint: the request kind (one of :data:`ENDPOINTS`).
        model: the model name (for its output cap and image allowance).
        mode: see :func:`estimate_input_tokens`.
        default_max_output: output bound for a model with no known cap when the
            request sets none.
        image_tokens: tokens per image part; defaults to :func:`image_token_bound`.
        file_tokens: tokens per file passed by reference.

    Raises:
        ValueError: unknown ``endpoint`` or ``mode``.
    """
    if image_tokens is None:
        image_tokens = image_token_bound(model)
    check_bound_args(body, mode, image_tokens, file_tokens)
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}; got {endpoint!r}")
    if default_max_output < 0:
        raise ValueError("default must be >= 0")
    bounds = request_bounds(
        body,
        endpoint,
        model,
        mode,
        request_output_cap(endpoint, body),
        default_max_output=default_max_output,
        image_tokens=image_tokens,
        file_tokens=file_tokens,
    )
    return RequestEstimate(*bounds[:3], bounds[3] or {}, *bounds[4:])


RequestBounds = tuple[int, int, bool, dict[str, str] | None, int, int]
""":class:`RequestEstimate`'s fields in order, with ``None`` for no price context."""


def request_bounds(
    body: Mapping[str, Any],
    endpoint: EndpointKind,
    model: str,
    mode: EstimateMode,
    output_cap: int | None,
    *,
    default_max_output: int = DEFAULT_MAX_OUTPUT_TOKENS,
    image_tokens: int | None = None,
    file_tokens: int = DEFAULT_FILE_TOKENS,
) -> RequestBounds:
    """:func:`estimate_request` of checked arguments, as a tuple (once per metered call).

    Args:
        body: the parsed JSON request body.
        endpoint: the request kind (one of :data:`ENDPOINTS`).
        model: the model name.
        mode: ``"ratio"`` or ``"bytes"``.
        output_cap: :func:`~payi_guard.meter.tokens.request_output_cap` of ``body``.
        default_max_output: see :func:`estimate_request`.
        image_tokens: see :func:`estimate_request`.
        file_tokens: see :func:`estimate_request`.

    Returns:
        ``(input_tokens, output_tokens, cache_writes, price_context, web_searches,
        file_searches)``; ``price_context`` is ``None`` when the request selects no
        price variant.
    """
    if image_tokens is None:
        image_tokens = image_token_bound(model)
    anthropic = endpoint == "anthropic_messages"
    asked = body.get("speed" if anthropic else "service_tier")
    context = None if asked is None else _price_context(body, endpoint) or None
    input_tokens = input_bound(body, endpoint, mode, image_tokens, file_tokens)
    web = files = 0
    if anthropic or endpoint == "responses":
        web, files = web_search_bound(body, endpoint), file_search_bound(body, endpoint)
        # What the provider's own tools read is billed as input too.
        input_tokens += tool_input_tokens(body, endpoint, web, files)
    return (
        input_tokens,
        output_bound(body, endpoint, model, default_max_output, output_cap),
        not anthropic or _mentions_key(body, "cache_control"),
        context,
        web,
        files,
    )


def estimate_cost(
    book: PriceBook,
    model: str,
    provider: str | None,
    body: Mapping[str, Any],
    endpoint: EndpointKind,
    *,
    mode: EstimateMode = "ratio",
    default_max_output: int = DEFAULT_MAX_OUTPUT_TOKENS,
    image_tokens: int | None = None,
    file_tokens: int = DEFAULT_FILE_TOKENS,
) -> Estimate:
    """An upper bound of a request's cost, priced as the guard prices a reservation.

    :func:`estimate_request` bounds the body; the rates come from ``book`` for the
    request's price variant, and :meth:`~payi_guard.pricing.Rates.upper_bound_nano`
    prices every input token at the highest input-side rate of every band the input
    bound can fall in.

    Args:
        book: the price book.
        model: the model name.
        provider: the provider name, if known.
        body: the parsed JSON request body.
        endpoint: the request kind (one of :data:`ENDPOINTS`).
        mode: see :func:`estimate_input_tokens`.
        default_max_output: see :func:`estimate_request`.
        image_tokens: see :func:`estimate_request`.
        file_tokens: see :func:`estimate_request`.

    Returns:
        The :class:`Estimate`.

    Raises:
        UnknownModel: no price is known and the policy gives none.
        ValueError: unknown ``endpoint`` or ``mode``.
    """
    rates = book.rates(model, provider, price_context=_price_context(body, endpoint))
    bound = estimate_request(
        body,
        endpoint,
        model,
        mode=mode,
        default_max_output=default_max_output,
        image_tokens=image_tokens,
        file_tokens=file_tokens,
    )
    nano = rates.upper_bound_nano(
        bound.input_tokens,
        bound.output_tokens,
        cache_writes=bound.cache_writes,
        web_searches=bound.web_searches,
        file_searches=bound.file_searches,
    )
    return Estimate(bound.input_tokens, bound.output_tokens, nano, rates)
