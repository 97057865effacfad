"""Server-sent event streams: decoded event by event, their usage tracked, bytes kept.

A metered stream goes through a :class:`StreamMeter`: an incremental :class:`SSEDecoder`
that keeps every event's raw bytes, and a :class:`StreamUsageTracker` that reads usage
from the events (with the usage parsers of :mod:`payi_guard.meter.parse`) and says which
events to forward. The client receives the original bytes unchanged, minus only what
the guard's own ``include_usage`` caused. Nothing here does I/O.
"""

from payi_guard.meter.sse.decoder import SSEDecoder, SSEEvent
from payi_guard.meter.sse.meter import StreamMeter, without_usage_member
from payi_guard.meter.sse.usage import (
    ESTIMATE_BYTES_PER_TOKEN,
    ESTIMATE_MARGIN_TOKENS,
    StreamError,
    StreamUsageTracker,
)

__all__ = [
    "ESTIMATE_BYTES_PER_TOKEN",
    "ESTIMATE_MARGIN_TOKENS",
    "SSEDecoder",
    "SSEEvent",
    "StreamError",
    "StreamMeter",
    "StreamUsageTracker",
    "without_usage_member",
]
