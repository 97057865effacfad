"""What a settled call adds to each counter: its usage priced, at the right model's rates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from payi_guard.engine.plan import Plan
from payi_guard.pricing import Rates, TokenUsage, UnknownModel

__all__ = ["charged_amounts", "rates_for"]


def charged_amounts(
    plan: Plan,
    usage: TokenUsage,
    *,
    response_model: str | None = None,
    other_models: Sequence[tuple[str, TokenUsage]] = (),
    price_context: Mapping[str, str] | None = None,
) -> tuple[list[int], int, bool]:
    """What ``usage`` adds to each counter, its cost, and whether it was priced.

    ``usage`` is priced as ``response_model`` when that model has a price and the
    requested model's price is not an override, at the tier ``price_context`` names
    when given, else the request's (:func:`rates_for`); each of ``other_models`` at
    its own model's price (unpriced when it has none).
    """
    call = plan.call
    if (not response_model or response_model == call.model) and (
        price_context is None
        or (not price_context and not call.price_context)  # the usual: standard tier
        or _same_context(price_context, call.price_context)
    ):
        rates = plan.rates  # what rates_for() gives then
    else:
        rates = rates_for(plan, response_model, price_context)
    priced = rates is not None
    cost = 0 if rates is None else rates.cost(usage)  # prices.cost_with(rates, usage)
    tokens = usage.total_tokens
    if other_models:
        context = call.price_context if price_context is None else price_context
        for model, part in other_models:
            tokens += part.total_tokens
            try:
                cost += plan.policy.prices.cost(model, call.provider, part, price_context=context)
            except UnknownModel:
                priced = False
    # amounts_by_counter(), inline.
    by_unit = {"usd": cost, "tokens": tokens, "requests": 1}
    amounts: list[int] = []  # a loop: no list comprehension's call on 3.11
    for counter in plan.counters:
        amounts.append(by_unit[counter.unit])
    return amounts, cost, priced


def rates_for(
    plan: Plan, response_model: str | None, price_context: Mapping[str, str] | None = None
) -> Rates | None:
    """The rates a call is charged at.

    Those of the model the response names, when it is another model with a price of
    its own (not the unknown-model fallback), else the requested model's; at the tier
    ``price_context`` names (the response's report of it), else at the request's. A
    requested model priced by an override keeps its override, whatever the tier.
    """
    rates = plan.rates
    call = plan.call
    same_context = price_context is None or _same_context(price_context, call.price_context)
    context = call.price_context if same_context else price_context
    same_model = not response_model or response_model == call.model
    if same_model and same_context:
        return rates
    if rates is not None and rates.source == "override":
        return rates
    prices = plan.policy.prices
    if response_model and not same_model:
        try:
            named: Rates | None = prices.rates(response_model, call.provider, price_context=context)
        except UnknownModel:
            named = None
        if named is not None and (named.source != "unknown_model" or rates is None):
            return named
        if same_context:
            return rates
    # The requested model, at the tier the response names.
    try:
        return prices.rates(call.model, call.provider, price_context=context)
    except UnknownModel:
        return rates


def _same_context(a: Mapping[str, str], b: Mapping[str, str] | None) -> bool:
    """Whether two price contexts select the same prices (no context is an empty one)."""
    if not a:
        return not b
    return b is not None and dict(a) == dict(b)
