"""One user's page, rendered on the server with no external asset.

It shows spend per day (an inline SVG chart), spend by model and by use case, limits,
recent calls and adjustments.

Everything a user can put in a field (user ids, model and use case names, request ids,
reasons) is HTML-escaped here, and user ids in links are URL-quoted.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import datetime, timezone
from decimal import Decimal
from urllib.parse import quote

from payi_guard.admin.recent import RecentCall
from payi_guard.admin.windows import LimitWindow
from payi_guard.ledger.analytics import History, NamedUsage
from payi_guard.money import decimal_text, decimal_usd

__all__ = ["render_user_page", "user_link"]

_CHART_W, _CHART_H, _PAD_L, _PAD_B, _PAD_T = 720, 220, 92, 28, 12


def user_link(user_id: str) -> str:
    """The path of a user's page, relative to the app's mount point."""
    return "users/" + quote(user_id, safe="")


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _usd(nano: int) -> str:
    return "$" + decimal_text(decimal_usd(nano))


def _amount(unit: str, value: Decimal | int) -> str:
    return "$" + decimal_text(Decimal(value)) if unit == "usd" else f"{int(value):,}"


def _time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def spend_chart(history: History) -> str:
    """Spend per day as an SVG bar chart (one bar per day, a tooltip on each)."""
    days = history.days
    top = max((day.cost for day in days), default=0)
    plot_w, plot_h = _CHART_W - _PAD_L - 8, _CHART_H - _PAD_B - _PAD_T
    step = plot_w / max(len(days), 1)
    parts = [
        f'<svg class="chart" id="spend-chart" viewBox="0 0 {_CHART_W} {_CHART_H}" '
        f'role="img" aria-label="Spend per day, last {len(days)} days">',
        f'<line x1="{_PAD_L}" y1="{_PAD_T + plot_h}" x2="{_CHART_W - 8}" y2="{_PAD_T + plot_h}" '
        'class="axis"/>',
        f'<text x="{_PAD_L - 6}" y="{_PAD_T + 4}" class="tick" text-anchor="end">'
        f"{_usd(top)}</text>",
        f'<text x="{_PAD_L - 6}" y="{_PAD_T + plot_h}" class="tick" text-anchor="end">$0</text>',
    ]
    for index, day in enumerate(days):
        height = 0.0 if top == 0 else plot_h * day.cost / top
        x = _PAD_L + index * step + step * 0.15
        y = _PAD_T + plot_h - height
        parts.append(
            f'<rect class="bar" data-date="{day.date}" '
            f'data-cost="{decimal_text(decimal_usd(day.cost))}" '
            f'x="{x:.1f}" y="{y:.1f}" width="{step * 0.7:.1f}" height="{height:.1f}">'
            f"<title>{day.date}: {_usd(day.cost)}, {day.calls} calls, "
            f"{day.refused} refused</title></rect>"
        )
    for index in sorted({0, len(days) // 2, len(days) - 1}):
        if 0 <= index < len(days):
            x = _PAD_L + index * step + step / 2
            parts.append(
                f'<text x="{x:.1f}" y="{_CHART_H - 8}" class="tick" text-anchor="middle">'
                f"{days[index].date[5:]}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)


def _breakdown(title: str, css_id: str, items: Sequence[NamedUsage], empty_name: str) -> str:
    top = max((item.cost for item in items), default=0)
    rows = []
    for item in items:
        width = 0 if top == 0 else round(160 * item.cost / top)
        name = item.name or empty_name
        rows.append(
            f'<tr><td class="name">{_e(name)}</td>'
            f'<td class="num">{_usd(item.cost)}</td><td class="num">{item.calls:,}</td>'
            f'<td><svg class="mini" viewBox="0 0 160 10" preserveAspectRatio="none" height="10">'
            f'<rect x="0" y="0" width="{width}" height="10" class="bar"/></svg></td></tr>'
        )
    body = "".join(rows) or '<tr><td colspan="4" class="empty">No calls in these days.</td></tr>'
    return (
        f'<section class="panel"><h2>{_e(title)}</h2><table id="{css_id}"><thead><tr>'
        '<th>Name</th><th class="num">Spend</th><th class="num">Calls</th><th>Share</th>'
        f"</tr></thead><tbody>{body}</tbody></table></section>"
    )


def _window_bars(window: LimitWindow) -> str:
    """The window's days as small bars (a tooltip on each), or a dash without them."""
    days = window.days
    if days is None:
        return '<span class="muted" title="no day-by-day history for this window">\u2014</span>'
    unit = window.limit.unit
    top = max((Decimal(value) for _, value in days), default=Decimal(0))
    step = 120 / max(len(days), 1)
    bars = []
    for index, (date, value) in enumerate(days):
        height = 0 if top == 0 else float(20 * Decimal(value) / top)
        bars.append(
            f'<rect class="bar" data-date="{date}" data-used="{decimal_text(Decimal(value))}" '
            f'x="{index * step + step * 0.1:.1f}" y="{20 - height:.1f}" '
            f'width="{step * 0.8:.1f}" height="{height:.1f}">'
            f"<title>{date}: {_amount(unit, value)}</title></rect>"
        )
    return (
        '<svg class="window" viewBox="0 0 120 20" preserveAspectRatio="none" height="20" '
        f'width="120" role="img" aria-label="{len(days)} days of this window">'
        + "".join(bars)
        + "</svg>"
    )


def _limits(limits: Sequence[LimitWindow]) -> str:
    rows = []
    for window in limits:
        limit = window.limit
        start = limit.window_start
        since = "" if start is None else start.strftime("%Y-%m-%d %H:%M UTC")
        rows.append(
            f'<tr class="{_e(limit.state)}"><td>{_e(limit.name)}</td><td>{_e(limit.scope)}</td>'
            f'<td class="num">{_amount(limit.unit, limit.used)}</td>'
            f'<td class="num">{_amount(limit.unit, limit.max)}</td>'
            f'<td class="num">{_amount(limit.unit, limit.remaining)}</td>'
            f'<td><span class="state {_e(limit.state)}">{_e(limit.state)}</span></td>'
            f"<td>{_e(since)}</td>"
            f"<td>{_e(limit.resets_at.strftime('%Y-%m-%d %H:%M UTC'))}</td>"
            f"<td>{_window_bars(window)}</td></tr>"
        )
    body = "".join(rows) or '<tr><td colspan="9" class="empty">No limit applies.</td></tr>'
    return (
        '<section class="panel"><h2>Limits, current windows</h2><table id="limits"><thead><tr>'
        '<th>Limit</th><th>Scope</th><th class="num">Used</th><th class="num">Max</th>'
        '<th class="num">Remaining</th><th>State</th><th>Since</th><th>Resets</th>'
        '<th title="settled calls per UTC day of the window">By day</th>'
        f"</tr></thead><tbody>{body}</tbody></table></section>"
    )


def _latency(ms: float | None) -> str:
    """A call's latency as people read it: never ``0 ms`` for a fast call."""
    if ms is None:
        return "\u2014"  # a refusal: no call was made
    if ms < 10:
        return f"{ms:.1f} ms" if ms >= 0.1 else "&lt;0.1 ms"
    return f"{ms:,.0f} ms"


def _recent(calls: Sequence[RecentCall]) -> str:
    rows = [
        f"<tr><td>{_e(_time(call.at))}</td><td>{_e(call.model)}</td>"
        f'<td class="num">{call.input_tokens:,}</td><td class="num">{call.output_tokens:,}</td>'
        f'<td class="num">{_usd(call.cost)}</td><td>{_e(call.outcome)}</td>'
        f'<td class="num">{_latency(call.latency_ms)}</td><td>{_e(call.request_id or "")}</td></tr>'
        for call in calls
    ]
    body = "".join(rows) or (
        '<tr><td colspan="8" class="empty">No call of this user seen by this process.</td></tr>'
    )
    return (
        '<section class="panel"><h2>Recent calls (this process)</h2><table id="recent"><thead>'
        '<tr><th>Time</th><th>Model</th><th class="num">Input</th><th class="num">Output</th>'
        '<th class="num">Cost</th><th>Outcome</th><th class="num">Latency</th>'
        f"<th>Request id</th></tr></thead><tbody>{body}</tbody></table></section>"
    )


def _adjustments(entries: Sequence[dict[str, object]]) -> str:
    rows = []
    for entry in entries:
        limits = entry.get("limits")
        named = ", ".join(str(x) for x in limits) if isinstance(limits, list) else ""
        rows.append(
            f"<tr><td>{_e(entry.get('at', ''))}</td><td>{_e(entry.get('op', ''))}</td>"
            f'<td>{_e(named)}</td><td class="num">{_e(entry.get("amount", ""))}</td>'
            f"<td>{_e(entry.get('by') or '')}</td><td>{_e(entry.get('reason') or '')}</td></tr>"
        )
    body = "".join(rows) or '<tr><td colspan="6" class="empty">No adjustment.</td></tr>'
    return (
        '<section class="panel"><h2>Adjustments</h2><table id="adjustments"><thead><tr>'
        '<th>When</th><th>Action</th><th>Limits</th><th class="num">Amount</th><th>By</th>'
        f"<th>Reason</th></tr></thead><tbody>{body}</tbody></table></section>"
    )


_STYLE = """
:root { --ok:#16a34a; --warning:#d97706; --exceeded:#dc2626; --bg:#f4f6f9; --card:#fff;
  --ink:#111827; --muted:#6b7280; --line:#e5e7eb; --accent:#2563eb; --head:#0f172a; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;
  background:var(--bg); color:var(--ink); }
.top { display:flex; align-items:center; gap:14px; padding:14px 28px; background:var(--head);
  color:#f8fafc; }
.top a { color:#93c5fd; text-decoration:none; }
.top h1 { margin:0; font-size:16px; font-weight:650; word-break:break-all; }
main { padding:22px 28px 40px; max-width:1320px; margin:0 auto; display:grid; gap:16px; }
.cards { display:grid; grid-template-columns:repeat(5,1fr); gap:14px; }
.card, .panel { background:var(--card); border:1px solid var(--line); border-radius:10px; }
.card { padding:12px 16px; }
.card .label { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.06em; }
.card .value { font-size:22px; font-weight:650; font-variant-numeric:tabular-nums; }
.panel { overflow-x:auto; }
.panel h2 { font-size:14px; margin:0; padding:12px 16px; border-bottom:1px solid var(--line); }
.two { display:grid; grid-template-columns:1fr 1fr; gap:16px; }
table { width:100%; border-collapse:collapse; }
th { text-align:left; font-size:12px; color:var(--muted); text-transform:uppercase;
  padding:8px 16px; background:#f9fafb; border-bottom:1px solid var(--line); }
td { padding:8px 16px; border-bottom:1px solid var(--line); font-variant-numeric:tabular-nums; }
th.num, td.num { text-align:right; white-space:nowrap; }
td.name { word-break:break-all; }
td.empty { color:var(--muted); }
.state { padding:2px 8px; border-radius:999px; font-size:12px; font-weight:600; }
.state.ok { background:#dcfce7; color:#166534; }
.state.warning { background:#fef3c7; color:#92400e; }
.state.exceeded { background:#fee2e2; color:#991b1b; }
.chart { width:100%; height:auto; display:block; padding:8px 12px; }
.chart .bar, .mini .bar, .window .bar { fill:var(--accent); }
.muted { color:var(--muted); }
.window { display:block; width:120px; height:20px; }
.chart .axis { stroke:#9ca3af; }
.chart .tick { fill:var(--muted); font-size:11px; }
.mini { display:block; width:100%; max-width:160px; min-width:48px; }
@media (max-width: 800px) { .cards { grid-template-columns:1fr 1fr; }
  .two { grid-template-columns:1fr; } main { padding:12px; }
  th, td { padding:6px 8px; } td.name { word-break:normal; overflow-wrap:anywhere; } }
"""


def render_user_page(
    *,
    title: str,
    user_id: str,
    history: History,
    limits: Sequence[LimitWindow],
    recent: Sequence[RecentCall],
    adjustments: Sequence[dict[str, object]],
    nonce: str,
) -> str:
    """The whole HTML page of one user (``nonce``: the CSP nonce of its style)."""
    days = history.days
    tokens_in = sum(day.input_tokens for day in days)
    tokens_out = sum(day.output_tokens for day in days)
    refused = sum(day.refused for day in days)
    cards = "".join(
        f'<div class="card"><div class="label">{label}</div>'
        f'<div class="value" id="{css_id}">{value}</div></div>'
        for label, css_id, value in (
            (f"Spend, {len(days)} days", "total-spend", _usd(history.cost)),
            ("Calls", "total-calls", f"{history.calls:,}"),
            ("Input tokens", "total-input", f"{tokens_in:,}"),
            ("Output tokens", "total-output", f"{tokens_out:,}"),
            ("Refused", "total-refused", f"{refused:,}"),
        )
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        f"<title>{_e(user_id)} · {_e(title)}</title>"
        f'<style nonce="{_e(nonce)}">{_STYLE}</style></head><body>'
        f'<header class="top"><a href="../" id="back">&larr; All users</a>'
        f'<h1 id="user-id">{_e(user_id)}</h1></header><main>'
        f'<div class="cards">{cards}</div>'
        f'<section class="panel"><h2>Spend per day (UTC)</h2>{spend_chart(history)}</section>'
        '<div class="two">'
        + _breakdown("By model", "by-model", history.by_model, "(unknown)")
        + _breakdown("By use case", "by-use-case", history.by_use_case, "(none)")
        + "</div>"
        + _limits(limits)
        + _recent(recent)
        + _adjustments(adjustments)
        + "</main></body></html>"
    )
