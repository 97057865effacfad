"""What a GenAI call asks for before it is sent, and what it cost once it ended."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from payi_guard._frozen import frozen_maker
from payi_guard.money import decimal_usd
from payi_guard.pricing import TokenUsage

__all__ = ["CallRecord", "CallRequest"]


@dataclass(frozen=True, slots=True)
class CallRequest:
    """What the meter knows about a GenAI call before it is sent.

    Attributes:
        model: the model (or Azure deployment) name.
        provider: ``openai``, ``anthropic``, ``azure`` or ``openai-compatible``.
        endpoint: ``chat``, ``responses``, ``embeddings``, ``completions`` or
            ``anthropic_messages``.
        input_tokens: an upper bound of the input tokens.
        max_output_tokens: an upper bound of the output tokens.
        stream: whether the response is streamed.
        cache_writes: whether the call may write a prompt cache (Anthropic
            ``cache_control``); cache-write rates then bound the input price.
        price_context: request facts that select a price variant, such as
            ``{"service_tier": "priority"}``.
        max_web_searches: an upper bound of the server-side web searches (billed each).
        max_file_searches: an upper bound of the server-side file search calls.
    """

    model: str
    provider: str = "openai"
    endpoint: str = "chat"
    input_tokens: int = 0
    max_output_tokens: int = 0
    stream: bool = False
    cache_writes: bool = True
    price_context: Mapping[str, str] | None = None
    max_web_searches: int = 0
    max_file_searches: int = 0


make_call_request: Final = frozen_maker(CallRequest)
"""``CallRequest(...)``, every field given in order, without ``__init__``'s cost."""


@dataclass(frozen=True, slots=True)
class CallRecord:
    """The outcome of a settled, released or recorded call (what ``genai_call`` logs).

    Attributes:
        user_id: the user charged.
        org_id: the org charged, if any.
        model: the model.
        provider: the provider.
        usage: the token usage charged (``None`` for a release).
        cost_nano: the amount charged to the ledger, nano-USD.
        reserved_nano: the amount that was reserved before the call, nano-USD.
        outcome: ``ok``, ``error``, ``incomplete``, ``unverified`` (the provider's usage
            could not be trusted: the reservation was charged), ``released`` or
            ``recorded``.
        latency_ms: wall time from reserve to settle.
        stream: whether the call streamed.
        priced: False when no price was known and nothing was charged in USD.
        response_model: the model the provider's response names (``None`` when it names
            none): an Azure deployment's model, the dated version of an alias.
        other_models: usage billed at another model's prices within the call, as
            ``(model, usage)`` pairs (Anthropic's advisor tool); included in
            ``cost_nano``, not in ``usage``.
        price_context: the tier that served the call (the response's report of it,
            else the request's :attr:`CallRequest.price_context`) as sorted
            ``(key, value)`` pairs, such as ``(("service_tier", "priority"),)``: its
            tokens are priced at that tier's rates (a ``prices:`` override has no
            tiers). Empty for the standard tier and for an ``unverified`` call.
    """

    user_id: str
    org_id: str | None
    model: str
    provider: str
    usage: TokenUsage | None
    cost_nano: int
    reserved_nano: int
    outcome: str
    latency_ms: float
    stream: bool
    priced: bool = True
    response_model: str | None = None
    other_models: tuple[tuple[str, TokenUsage], ...] = ()
    price_context: tuple[tuple[str, str], ...] = ()

    @property
    def cost_usd(self) -> Decimal:
        """The amount charged, in dollars, exactly."""
        return decimal_usd(self.cost_nano)


make_call_record: Final = frozen_maker(CallRecord)
"""``CallRecord(...)``, every field given in order, without ``__init__``'s cost."""
