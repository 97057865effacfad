"""What a settled call adds to each counter: its usage priced, at the right model's rates."""

from __future__ import annotations

from collections.abc import Sequence

from payi_guard.engine.plan import Plan
from payi_guard.pricing import Rates, TokenUsage, UnknownModel

__all__ = ["charged_amounts", "rates_for"]


def charged_amounts(
    plan: Plan,
    usage: TokenUsage,
    *,
    response_model: str | None = None,
    other_models: Sequence[tuple[str, TokenUsage]] = (),
) -> tuple[list[int], int, bool]:
    """What ``usage`` adds to each counter, its cost, and whether it was priced.

    ``usage`` is priced as ``response_model`` when that model has a price and the
    requested model's price is not an override (:func:`rates_for`); each of
    ``other_models`` at its own model's price (unpriced when it has none).
    """
    if not response_model or response_model == plan.call.model:
        rates = plan.rates  # what rates_for() gives then
    else:
        rates = rates_for(plan, response_model)
    priced = rates is not None
    cost = 0 if rates is None else rates.cost(usage)  # prices.cost_with(rates, usage)
    tokens = usage.total_tokens
    for model, part in other_models:
        tokens += part.total_tokens
        try:
            cost += plan.policy.prices.cost(
                model, plan.call.provider, part, price_context=plan.call.price_context
            )
        except UnknownModel:
            priced = False
    # amounts_by_counter(), inline.
    by_unit = {"usd": cost, "tokens": tokens, "requests": 1}
    return [by_unit[c.unit] for c in plan.counters], cost, priced


def rates_for(plan: Plan, response_model: str | None) -> Rates | None:
    """The rates a call is charged at.

    Those of the model the response names, when it is another model with a price of
    its own (not the unknown-model fallback), else the reservation's. A requested
    model priced by an override keeps its override.
    """
    rates = plan.rates
    call = plan.call
    if not response_model or response_model == call.model:
        return rates
    if rates is not None and rates.source == "override":
        return rates
    try:
        named = plan.policy.prices.rates(
            response_model, call.provider, price_context=call.price_context
        )
    except UnknownModel:
        return rates
    if named.source == "unknown_model" and rates is not None:
        return rates
    return named
