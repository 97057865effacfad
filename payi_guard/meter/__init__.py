"""Metering of GenAI calls at the HTTP transport.

Every OpenAI, Anthropic or OpenAI-compatible call goes through one guarding transport
installed on the client's HTTP client (``httpx2`` for openai 3.x and anthropic 2.x,
``httpx`` for older SDKs and plain clients). Gemini, Bedrock, Mistral, Groq and LiteLLM
are metered the same way by :mod:`payi_guard.meter.providers` (Bedrock at botocore's
HTTP session). Before a call is sent the guard reserves
its upper-bound cost for the user in the attribution context; after it, the actual
usage is settled (streams included, whenever and however they end) or the reservation
is released (error statuses, each SDK retry on its own). A refused call never reaches
the provider and arrives as exactly one exception the SDK does not retry.

Entry points (the usual way in is through :class:`payi_guard.Guard`)::

    client = guard.wrap(openai.OpenAI())        # one client
    guard.instrument(default_user_id="system")  # every client of every installed SDK
    guard.uninstrument()

* :func:`wrap`, :func:`instrument`, :func:`uninstrument`: see
  :mod:`payi_guard.meter.clients` for the options (``include_usage``,
  ``skip_include_usage``, ``retry_without_stream_options``, ``provider``, ``payi``,
  ``estimate_mode``, ``refusal``).
* :func:`is_guarded`, :func:`guarded_by`: inspect a client.
* :func:`flush_abandoned_streams`: wait for streams the garbage collector found open
  to be settled (they are settled on a background thread).

Modules, from the pure ones up:

* :mod:`~payi_guard.meter.tokens`: token bounds of a request body (input and output);
* :mod:`~payi_guard.meter.tokenizer`: a request's input counted with its tokenizer;
* :mod:`~payi_guard.meter.estimate`: what a request reserves, and its upper-bound cost;
* :mod:`~payi_guard.meter.parse`: endpoints, request bodies and usage objects;
* :mod:`~payi_guard.meter.sse`: server-sent events and the usage they report;
* :mod:`~payi_guard.meter.options`: the options of ``wrap`` / ``instrument``;
* :mod:`~payi_guard.meter.refusal`: how refusals reach the caller;
* :mod:`~payi_guard.meter.payi_bridge`: Pay-i attribution headers;
* :mod:`~payi_guard.meter.streams`: metered response streams, settled exactly once;
* :mod:`~payi_guard.meter.transport`: the guarding transport's decisions;
* :mod:`~payi_guard.meter.transport_classes`: the httpx and httpx2 transports applying them;
* :mod:`~payi_guard.meter.clients`: installing it (``wrap``, ``instrument``);
* :mod:`~payi_guard.meter.providers`: the other SDKs' wire formats and installation.

Streams: chat and legacy completions streams are sent with
``stream_options.include_usage`` (when the caller did not ask for it, the extra
usage-only chunk is removed before the caller sees it, so ``chunk.choices[0]`` code
keeps working). A server that refuses the option with a 400/422 naming it gets the
request again without it, once, and its base URL is remembered; ``include_usage=False``
or ``skip_include_usage=[url, ...]`` switch it off up front. A stream closed early, cut
by the network or garbage-collected is charged the input the provider reported (else the
request counted by the model's tokenizer, see :mod:`~payi_guard.meter.tokenizer`, else
the request's bound) plus the output received, counted from its text plus a margin.
A stream whose body was already read (a mock transport's ``Response(content=...)``) is
metered and settled at once.
"""

from __future__ import annotations

from payi_guard.meter.clients import guarded_by, instrument, is_guarded, uninstrument, wrap
from payi_guard.meter.streams import flush_abandoned_streams

__all__ = [
    "flush_abandoned_streams",
    "guarded_by",
    "instrument",
    "is_guarded",
    "uninstrument",
    "wrap",
]
