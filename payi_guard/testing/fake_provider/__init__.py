"""A local fake of the OpenAI and Anthropic HTTP APIs, for tests and demos.

:class:`FakeProvider` is a real HTTP server on ``127.0.0.1`` (stdlib only) that answers
the way the real APIs do, on the wire: the same JSON bodies and usage objects, the same
server-sent event streams, the same error bodies and headers. Point the official SDKs at
it with a dummy key::

    import openai
    from payi_guard.testing import FakeProvider, Scripted

    with FakeProvider() as fp:
        client = openai.OpenAI(base_url=fp.openai_base_url, api_key="sk-test", max_retries=0)
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi there"}]
        )
        assert reply.usage.prompt_tokens == 2
        fp.enqueue(Scripted(status=429))  # the next call is rate limited
        assert fp.requests[0].json["model"] == "gpt-4o-mini"

Endpoints (any path prefix works, so ``base_url="http://host/custom/v1"`` and Azure's
``/openai/deployments/{name}/...`` are served too):

* ``POST .../chat/completions``: plain and streamed, ``n`` choices, tool calls,
  ``stream_options.include_usage`` (the final chunk has ``choices: []`` and ``usage``).
* ``POST .../responses``: plain and streamed with typed events, ending in
  ``response.completed``, ``response.incomplete`` or ``response.failed``.
* ``POST .../embeddings``: ``float`` and ``base64`` (little-endian float32) encodings.
* ``POST .../completions`` (legacy): plain and streamed.
* ``POST .../v1/messages`` (Anthropic): plain and the full event stream;
  ``POST .../v1/messages/count_tokens``.
* ``POST .../audio/transcriptions`` and ``POST .../files`` (multipart): recorded and
  answered, nothing more. ``GET .../models`` lists models.

Deterministic token counts, so tests can compute costs:

* input tokens are the whitespace-separated words of the request text
  (:func:`count_input_tokens`): string values of ``messages``, ``system``,
  ``instructions``, ``input`` and ``prompt``, walking lists and the ``content``,
  ``text``, ``input``, ``output``, ``tool_calls``, ``function`` and ``arguments`` keys
  of objects (so roles, names and ids do not count); integers in an
  ``input``/``prompt`` token array count one each; never less than 1. Scripted
  ``cached_tokens`` / ``cache_write_tokens`` come on top of that count: OpenAI reports
  ``prompt_tokens = words + cached_tokens``; Anthropic reports ``input_tokens = words``
  next to its cache fields.
* output tokens, per choice, are the words of the reply (``reply=`` or
  ``Scripted(text=...)``) capped by ``max_completion_tokens`` / ``max_tokens`` /
  ``max_output_tokens`` (a capped reply ends with ``length`` / ``max_tokens`` /
  ``incomplete``), plus ``ceil(len(arguments) / 4)`` per tool call (arguments stream in
  4-character pieces), plus scripted ``reasoning_tokens``. Streams send one text delta
  per word, so the deltas joined give the reply.
* ``Scripted(usage={...})`` deep-merges over the generated usage object, in the API's
  own field names, to report anything else.

Every request is recorded (:attr:`FakeProvider.requests`). Errors, resets, gzip and
delays are scripted per request with :class:`Scripted` (:meth:`FakeProvider.enqueue`) or
per path (:meth:`FakeProvider.set_default`).
"""

from payi_guard.testing.fake_provider.provider import FakeProvider
from payi_guard.testing.fake_provider.script import (
    DEFAULT_REPLY,
    RawEvent,
    RecordedRequest,
    Scripted,
    ToolCall,
    count_input_tokens,
    count_words,
)

__all__ = [
    "DEFAULT_REPLY",
    "FakeProvider",
    "RawEvent",
    "RecordedRequest",
    "Scripted",
    "ToolCall",
    "count_input_tokens",
    "count_words",
]
