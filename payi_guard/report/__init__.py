r"""``payi-guard report``: per-user spend, calls and budget events from payi_guard's logs.

The report reads the JSON lines that payi_guard's structlog events produce (one object per
line, as :func:`payi_guard.log.configure_json` writes them) and prints one row per user, org,
model or use case: calls, tokens, the exact cost, its share of the total, the p50/p90/p99
cost per call and the budget events (blocked, warned, overruns) with the error count.

Reading rules:

* A line is parsed from its first ``{``, so a JSON object after a plain-text prefix
  (``2026-11-27 12:00:00 {...}``) is read too. A line that is not a JSON object, or a
  ``genai_call`` whose ``cost_usd`` is unusable (not a number, negative, not finite, over
  one billion USD, digits other than ASCII ``0-9``) or whose ``input_tokens`` /
  ``output_tokens`` are not whole numbers from 0 to :data:`MAX_TOKENS`, is *skipped*
  and counted, and the summary at the end says how many. Blank lines count as read,
  not as skipped. JSON objects of other events are *other events*, also counted.
  Reading never stops on a bad line.
* ``cost_usd`` is parsed as :class:`~decimal.Decimal` and summed exactly: a total equals the
  exact decimal sum of the lines' values. A missing or ``null`` ``cost_usd`` counts as zero;
  a numeric string is accepted.
* ``calls`` counts the calls sent to a provider: every ``genai_call`` whose ``outcome`` is
  not ``refused``. Tokens and cost add up every ``genai_call`` line (a refused call costs
  nothing), so the totals reconcile with the ledger.
* ``blocked`` counts refusals once each: every ``genai_call`` with ``outcome == "refused"``,
  plus every ``budget_exceeded`` event that is not paired with one. A ``budget_exceeded``
  and a refused call pair when they carry the same ``request_id`` and ``user_id`` and are
  logged within :data:`PAIRING_WINDOW` of each other (they are logged back to back by the
  request that was refused). A ``budget_exceeded`` without a ``request_id`` (a refusal at
  the web gate, before any call) always counts.
* ``warned`` and ``overruns`` count ``budget_warning`` and ``budget_overrun`` events;
  ``errors`` counts calls with ``outcome == "error"``.
* ``adjustments`` counts operators' actions (``budget_adjusted`` events: an ``adjust`` or
  a ``reset``, one line per limit it changed, counted once by ``adjustment_id``) and
  ``adjusted_usd`` sums what they added to money counters (negative: gave back), each
  action once, on the first money limit it changed. They are kept apart from
  ``cost_usd``, which stays what the calls cost: a user's ledger spend for a window is
  their calls' cost plus that window's adjustments. The table shows an ``adjusted``
  column only when the logs hold adjustments.
* Budget events carry no model or use case: with ``--by model`` or ``--by use_case`` they
  land in the ``(none)`` row unless the line names one, and ``--model`` drops them. With
  ``--by org`` (and ``--org``) the org is ``org_id``, else the first segment of a
  composite ``user_id`` (``acme`` for ``acme:alice``).
* ``--since`` is inclusive and ``--until`` exclusive, compared with the line's
  ``timestamp`` (ISO 8601 or epoch seconds; a timestamp without an offset is UTC). With
  either option, events without a readable timestamp are left out (and counted); without
  a time option every event is kept.

Percentiles are nearest-rank over the cost of sent calls. They are exact (to the
nano-USD) for a group of up to :data:`EXACT_SAMPLES` calls; past that a group switches to
a fixed-size log-bucket histogram over integer nano-USD whose answers are within
:data:`PERCENTILE_RELATIVE_ERROR` (about 0.2 %) of the true value, marked ``~`` in the table
and ``percentiles_exact: false`` in CSV and JSON. Memory grows with the number of groups
(at most about 110 KB each), never with the number of lines.

Output never shows user text raw: the table and CSV escape control characters in keys
(``\x1b``, ``\n``; a newline in a user id can never forge a row), CSV keys that a
spreadsheet would run as formulas get a leading ``'``, and JSON escapes everything
outside printable ASCII. The table fits the terminal (80 columns unless it is wider,
or ``--width``): long keys are cut with ``…`` and optional columns are left out, named
in a note.

Run it as ``payi-guard report LOG... [options]`` or ``python -m payi_guard.report``.

The package reads (:mod:`~payi_guard.report.read`), aggregates
(:mod:`~payi_guard.report.aggregate`, :mod:`~payi_guard.report.percentiles`) and renders
(:mod:`~payi_guard.report.render`, with :mod:`~payi_guard.report.table` for terminal
text); the command line lives in :mod:`payi_guard.cli`.
"""

from __future__ import annotations

from payi_guard.report.aggregate import (
    PAIRING_WINDOW,
    GroupBy,
    Report,
    ReportBuilder,
    ReportFilter,
    ReportRow,
)
from payi_guard.report.percentiles import (
    EXACT_SAMPLES,
    PERCENTILE_RELATIVE_ERROR,
    CostDistribution,
)
from payi_guard.report.read import (
    MAX_LINE_BYTES,
    MAX_TOKENS,
    UnreadableLog,
    parse_time_bound,
    read_logs,
)
from payi_guard.report.render import summary, write_csv, write_json, write_table

__all__ = [
    "EXACT_SAMPLES",
    "MAX_LINE_BYTES",
    "MAX_TOKENS",
    "PAIRING_WINDOW",
    "PERCENTILE_RELATIVE_ERROR",
    "CostDistribution",
    "GroupBy",
    "Report",
    "ReportBuilder",
    "ReportFilter",
    "ReportRow",
    "UnreadableLog",
    "parse_time_bound",
    "read_logs",
    "summary",
    "write_csv",
    "write_json",
    "write_table",
]
