"""AWS Bedrock through ``boto3`` ``bedrock-runtime`` (``payi-guard[bedrock]``).

The code is in :mod:`~payi_guard.meter.providers.bedrock_session`, moved there whole so
that its history follows; the next step splits it by responsibility.
"""

from __future__ import annotations

from payi_guard.meter.providers.bedrock_session import (
    DIALECT,
    BedrockDialect,
    GuardedSession,
    guarded_by,
    http_client_of,
    instrument,
    uninstrument,
    wrap,
)
from payi_guard.meter.providers.bedrock_session import base_model as base_model
from payi_guard.meter.providers.bedrock_session import converse_usage as converse_usage
from payi_guard.meter.providers.bedrock_session import family_usage as family_usage
from payi_guard.meter.providers.bedrock_session import header_report as header_report

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
