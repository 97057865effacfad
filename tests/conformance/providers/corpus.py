"""The provider recordings, and what each one must yield: per SDK call, the usage the SDK
exposes and the tokens a guard must charge.

Every number below was read from the recorded response (the wire), not from an SDK:
``usage`` lists, under the dotted paths :func:`~conformance.providers.drivers.flatten_counts`
gives, the counts the SDK must hand to the application; ``charge`` is the same usage in
payi_guard's terms (``ParsedUsage``: ``input_tokens`` excludes cache reads and writes,
``output_tokens`` includes reasoning), by these rules:

* Gemini (``usageMetadata``): input = ``promptTokenCount`` - ``cachedContentTokenCount``
  (+ ``toolUsePromptTokenCount``), cache read = ``cachedContentTokenCount``, output =
  ``totalTokenCount`` - ``promptTokenCount`` - ``toolUsePromptTokenCount``, reasoning =
  ``thoughtsTokenCount``; ``promptTokensDetails`` and ``cacheTokensDetails`` give the
  audio, image and video parts of the prompt and of its cached part (``media``, in
  genai-prices' usage keys: ``input_audio_tokens`` counts cached audio too, as
  ``input_tokens`` counts cache reads). Output is taken from the total because
  ``candidatesTokenCount`` excludes the thoughts on current models but included them on
  early 2.5 previews (the ``gemini-2.5-flash-preview-04-17`` recording: 8 + 87 = 95,
  thoughts 79).
* Bedrock Converse (``usage``): ``inputTokens`` already excludes ``cacheReadInputTokens``
  and ``cacheWriteInputTokens``. ``InvokeModel``: the ``X-Amzn-Bedrock-*-Token-Count``
  headers (input excludes the cache counts, which have their own headers), the same
  numbers as the model family's body. Streams: ``amazon-bedrock-invocationMetrics`` in the
  last chunk (``inputTokenCount``, ``outputTokenCount``).
* Mistral, Groq, LiteLLM (OpenAI-style ``usage``): input = ``prompt_tokens`` -
  ``prompt_tokens_details.cached_tokens``; output = ``completion_tokens`` (reasoning
  included). Groq streams report it in the last chunk's ``x_groq.usage``.

``price`` is the genai-prices provider id and model reference the call is priced under.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import ROUND_CEILING, Decimal

from conformance.providers.drivers import Call

PRICED_AT = datetime(2026, 6, 1, tzinfo=timezone.utc)
"""The day prices are resolved at: genai-prices carries dated price changes."""


@dataclass(frozen=True)
class Charge:
    """Tokens to charge for one call, in ``payi_guard.meter.parse.ParsedUsage`` terms."""

    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    media: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Recording:
    """One cassette, how to replay it, and what the replay must yield.

    Attributes:
        cassette: the cassette's path under ``cassettes/``.
        provider: ``gemini``, ``bedrock``, ``mistral``, ``groq`` or ``litellm``.
        call: the SDK call that replays it.
        usage: per SDK call, the token counts the SDK must expose (a subset check).
        charge: per SDK call, the tokens to charge.
        price: ``(genai-prices provider id, model reference)``.
        kinds: what the recording covers (``stream``, ``async``, ``thoughts``...).
        served: the indices of the exchanges the SDK calls consume (default: all; an
            OAuth token exchange before a Vertex call is not replayed).
    """

    cassette: str
    provider: str
    call: Call
    usage: tuple[Mapping[str, int], ...]
    charge: tuple[Charge, ...]
    price: tuple[str, str]
    kinds: frozenset[str] = field(default_factory=frozenset)
    served: tuple[int, ...] | None = None

    @property
    def id(self) -> str:
        return self.cassette.removesuffix(".yaml")

    @property
    def source(self) -> str:
        """The project the cassette comes from (its folder under the provider)."""
        return self.cassette.split("/")[1]


def _kinds(*names: str) -> frozenset[str]:
    return frozenset(names)


_V1BETA = {"api_version": "v1beta"}
_VERTEX = {"vertex": "1", "project": "pydantic-ai", "location": "global"}

GEMINI = (
    Recording(
        "gemini/openllmetry/test_client_spans.yaml",
        "gemini",
        Call("genai.generate", "gemini-2.5-flash", options=_V1BETA),
        usage=(
            {
                "prompt_token_count": 5,
                "candidates_token_count": 877,
                "thoughts_token_count": 1058,
                "total_token_count": 1940,
            },
        ),
        charge=(Charge(5, 1935, reasoning_tokens=1058),),
        price=("google", "gemini-2.5-flash"),
        kinds=_kinds("generate", "gzip", "thoughts"),
    ),
    Recording(
        "gemini/pydantic-ai/test_google_model_stream.yaml",
        "gemini",
        Call("genai.stream", "gemini-2.5-flash", options=_V1BETA),
        usage=(
            {
                "prompt_token_count": 15,
                "candidates_token_count": 8,
                "thoughts_token_count": 16,
                "total_token_count": 39,
            },
        ),
        charge=(Charge(15, 24, reasoning_tokens=16),),
        price=("google", "gemini-2.5-flash"),
        kinds=_kinds("stream", "thoughts"),
    ),
    Recording(
        "gemini/pydantic-ai/test_google_model_thinking_config.yaml",
        "gemini",
        Call("genai.agenerate", "gemini-2.5-pro", options=_V1BETA),
        usage=(
            {
                "prompt_token_count": 15,
                "candidates_token_count": 8,
                "thoughts_token_count": 285,
                "total_token_count": 308,
            },
        ),
        charge=(Charge(15, 293, reasoning_tokens=285),),
        price=("google", "gemini-2.5-pro"),
        kinds=_kinds("generate", "async", "thoughts"),
    ),
    Recording(
        "gemini/pydantic-ai/test_google_model_mobile_youtube_video_url_input.yaml",
        "gemini",
        Call("genai.generate", "gemini-2.5-flash", options=_V1BETA),
        usage=(
            {
                "prompt_token_count": 17713,
                "cached_content_token_count": 17379,
                "candidates_token_count": 68,
                "thoughts_token_count": 821,
                "total_token_count": 18602,
            },
        ),
        charge=(
            Charge(
                334,
                889,
                cache_read_tokens=17379,
                reasoning_tokens=821,
                media={
                    "input_audio_tokens": 1917,
                    "cache_audio_read_tokens": 1881,
                    "input_video_tokens": 15780,
                    "cache_video_read_tokens": 15483,
                },
            ),
        ),
        price=("google", "gemini-2.5-flash"),
        kinds=_kinds("generate", "cache", "thoughts", "video"),
    ),
    Recording(
        "gemini/pydantic-ai/test_google_stream_usage_is_live_mid_stream.yaml",
        "gemini",
        Call("genai.astream", "gemini-2.5-flash", options=_V1BETA),
        usage=(
            {
                "prompt_token_count": 18,
                "candidates_token_count": 80,
                "thoughts_token_count": 35,
                "total_token_count": 133,
            },
        ),
        charge=(Charge(18, 115, reasoning_tokens=35),),
        price=("google", "gemini-2.5-flash"),
        kinds=_kinds("stream", "async", "thoughts", "running-totals"),
    ),
    Recording(
        "gemini/pydantic-ai/test_google_vertex_service_tier_flex_stream.yaml",
        "gemini",
        Call("genai.stream", "gemini-3-flash-preview", options=_VERTEX),
        usage=(
            {
                "prompt_token_count": 5,
                "candidates_token_count": 1,
                "thoughts_token_count": 100,
                "total_token_count": 106,
            },
        ),
        charge=(Charge(5, 101, reasoning_tokens=100),),
        price=("google", "gemini-3-flash-preview"),
        kinds=_kinds("vertex", "stream", "thoughts", "flex"),
    ),
    Recording(
        "gemini/pydantic-ai/test_google_vertex_service_tier_flex.yaml",
        "gemini",
        Call("genai.agenerate", "gemini-3-flash-preview", options=_VERTEX),
        usage=(
            {
                "prompt_token_count": 5,
                "candidates_token_count": 1,
                "thoughts_token_count": 51,
                "total_token_count": 57,
            },
        ),
        charge=(Charge(5, 52, reasoning_tokens=51),),
        price=("google", "gemini-3-flash-preview"),
        kinds=_kinds("vertex", "generate", "async", "thoughts", "flex"),
        served=(1,),
    ),
    Recording(
        "gemini/pydantic-ai/test_google_model_max_tokens_thinking_model_empty_response.yaml",
        "gemini",
        Call("genai.agenerate", "gemini-2.5-pro", options=_V1BETA),
        # Cut off by max_tokens while thinking: no candidatesTokenCount at all.
        usage=({"prompt_token_count": 15, "thoughts_token_count": 2, "total_token_count": 17},),
        charge=(Charge(15, 2, reasoning_tokens=2),),
        price=("google", "gemini-2.5-pro"),
        kinds=_kinds("generate", "async", "thoughts", "max-tokens"),
    ),
    Recording(
        "gemini/pydantic-ai/test_google_model_thinking_part_iter.yaml",
        "gemini",
        Call("genai.stream", "gemini-2.5-pro", options=_V1BETA),
        # 26 chunks, each with running totals; the first four have no candidatesTokenCount.
        usage=(
            {
                "prompt_token_count": 34,
                "candidates_token_count": 469,
                "thoughts_token_count": 787,
                "total_token_count": 1290,
            },
        ),
        charge=(Charge(34, 1256, reasoning_tokens=787),),
        price=("google", "gemini-2.5-pro"),
        kinds=_kinds("stream", "thoughts", "running-totals"),
    ),
    Recording(
        "gemini/pydantic-ai/test_google_model_web_fetch_tool_stream.yaml",
        "gemini",
        Call("genai.astream", "gemini-2.5-flash", options=_V1BETA),
        # URL context: the fetched page is billed as toolUsePromptTokenCount (input).
        usage=(
            {
                "prompt_token_count": 32,
                "tool_use_prompt_token_count": 4610,
                "candidates_token_count": 25,
                "thoughts_token_count": 37,
                "total_token_count": 4704,
            },
        ),
        charge=(Charge(4642, 62, reasoning_tokens=37),),
        price=("google", "gemini-2.5-flash"),
        kinds=_kinds("stream", "async", "thoughts", "tool-use-prompt", "url-context"),
    ),
    Recording(
        "gemini/pydantic-ai/test_google_model_file_search_tool_stream.yaml",
        "gemini",
        Call("genai.stream", "gemini-2.5-pro", options=_V1BETA),
        # #0-#2 create the file search store and upload to it, #4 deletes it: not
        # metered calls. The retrieved text is toolUsePromptTokenCount (input).
        usage=(
            {
                "prompt_token_count": 15,
                "tool_use_prompt_token_count": 770,
                "candidates_token_count": 37,
                "thoughts_token_count": 742,
                "total_token_count": 1564,
            },
        ),
        charge=(Charge(785, 779, reasoning_tokens=742),),
        price=("google", "gemini-2.5-pro"),
        kinds=_kinds("stream", "thoughts", "tool-use-prompt", "file-search"),
        served=(3,),
    ),
    Recording(
        "gemini/pydantic-ai/test_google_model_cached_content.yaml",
        "gemini",
        Call("genai.generate", "gemini-2.5-flash", calls=2, options=_V1BETA),
        # Explicit context cache: #0 creates it (cachedContents, not a metered call),
        # #1 and #2 read 3,512 of their 3,520 prompt tokens from it, #3 deletes it.
        usage=(
            {
                "prompt_token_count": 3520,
                "cached_content_token_count": 3512,
                "candidates_token_count": 2,
                "thoughts_token_count": 42,
                "total_token_count": 3564,
            },
            {
                "prompt_token_count": 3520,
                "cached_content_token_count": 3512,
                "candidates_token_count": 2,
                "thoughts_token_count": 51,
                "total_token_count": 3573,
            },
        ),
        charge=(
            Charge(8, 44, cache_read_tokens=3512, reasoning_tokens=42),
            Charge(8, 53, cache_read_tokens=3512, reasoning_tokens=51),
        ),
        price=("google", "gemini-2.5-flash"),
        kinds=_kinds("generate", "cache", "cached-content", "thoughts"),
        served=(1, 2),
    ),
    # Google Search grounding: genai-prices prices the grounding fee (web_searches), but
    # payi_guard does not charge it (README, "Grounding fees per request are not
    # priced"), so the expected cost is the tokens only; the search results the model
    # read are toolUsePromptTokenCount, input.
    Recording(
        "gemini/pydantic-ai/test_google_model_web_search_tool.yaml",
        "gemini",
        Call("genai.generate", "gemini-2.5-pro", calls=2, options=_V1BETA),
        usage=(
            {
                "prompt_token_count": 17,
                "tool_use_prompt_token_count": 119,
                "candidates_token_count": 201,
                "thoughts_token_count": 213,
                "total_token_count": 550,
            },
            {
                "prompt_token_count": 209,
                "tool_use_prompt_token_count": 286,
                "candidates_token_count": 206,
                "thoughts_token_count": 131,
                "total_token_count": 832,
            },
        ),
        charge=(
            Charge(136, 414, reasoning_tokens=213),
            Charge(495, 337, reasoning_tokens=131),
        ),
        price=("google", "gemini-2.5-pro"),
        kinds=_kinds("generate", "thoughts", "tool-use-prompt", "grounding"),
    ),
    Recording(
        "gemini/pydantic-ai/test_google_model_web_search_tool_stream.yaml",
        "gemini",
        Call("genai.stream", "gemini-2.5-pro", options=_V1BETA),
        # Grounding fee not charged, as above. #1, the follow-up turn, is made without
        # streaming (generateContent): one recording replays one SDK method, and
        # test_google_model_web_search_tool above replays that kind of call.
        usage=(
            {
                "prompt_token_count": 17,
                "tool_use_prompt_token_count": 102,
                "candidates_token_count": 241,
                "thoughts_token_count": 412,
                "total_token_count": 772,
            },
        ),
        charge=(Charge(119, 653, reasoning_tokens=412),),
        price=("google", "gemini-2.5-pro"),
        kinds=_kinds("stream", "thoughts", "tool-use-prompt", "grounding", "running-totals"),
        served=(0,),
    ),
    Recording(
        "gemini/pydantic-ai/test_mixed_content_ordering[google_2_5].yaml",
        "gemini",
        Call("genai.generate", "gemini-2.5-flash", calls=2, options=_V1BETA),
        # #1: an image tool return, part of it (and of the text) read from the
        # implicit cache; cacheTokensDetails splits the cache reads by modality.
        usage=(
            {
                "prompt_token_count": 38,
                "candidates_token_count": 12,
                "thoughts_token_count": 30,
                "total_token_count": 80,
            },
            {
                "prompt_token_count": 373,
                "cached_content_token_count": 204,
                "candidates_token_count": 89,
                "thoughts_token_count": 167,
                "total_token_count": 629,
            },
        ),
        charge=(
            Charge(38, 42, reasoning_tokens=30),
            Charge(
                169,
                256,
                cache_read_tokens=204,
                reasoning_tokens=167,
                media={"input_image_tokens": 258, "cache_image_read_tokens": 141},
            ),
        ),
        price=("google", "gemini-2.5-flash"),
        kinds=_kinds("generate", "thoughts", "image", "implicit-cache"),
    ),
    Recording(
        "gemini/pydantic-ai/test_multimodal_tool_return_matrix[direct-binary-image-google_2_5].yaml",
        "gemini",
        Call("genai.agenerate", "gemini-2.5-flash", calls=2, options=_V1BETA),
        usage=(
            {
                "prompt_token_count": 41,
                "candidates_token_count": 10,
                "thoughts_token_count": 226,
                "total_token_count": 277,
            },
            {
                "prompt_token_count": 345,
                "cached_content_token_count": 191,
                "candidates_token_count": 80,
                "thoughts_token_count": 141,
                "total_token_count": 566,
            },
        ),
        charge=(
            Charge(41, 236, reasoning_tokens=226),
            Charge(
                154,
                221,
                cache_read_tokens=191,
                reasoning_tokens=141,
                media={"input_image_tokens": 258, "cache_image_read_tokens": 143},
            ),
        ),
        price=("google", "gemini-2.5-flash"),
        kinds=_kinds("generate", "async", "thoughts", "image", "implicit-cache"),
    ),
    Recording(
        "gemini/crewai/test_gemini_token_usage_tracking.yaml",
        "gemini",
        Call("genai.generate", "gemini-2.0-flash-001", options=_V1BETA),
        usage=({"prompt_token_count": 1, "candidates_token_count": 11, "total_token_count": 12},),
        charge=(Charge(1, 11),),
        price=("google", "gemini-2.0-flash-001"),
        kinds=_kinds("generate"),
    ),
)

_CLAUDE_3_SONNET = "anthropic.claude-3-sonnet-20240229-v1:0"
_TITAN = "amazon.titan-text-express-v1"
_CROSS_REGION_ARN = (
    "arn:aws:bedrock:us-east-1:012345678901:inference-profile/"
    "us.anthropic.claude-3-7-sonnet-20250219-v1:0"
)
_SONNET_4_5 = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
_HAIKU_4_5_EU = "eu.anthropic.claude-haiku-4-5-20251001-v1:0"

BEDROCK = (
    Recording(
        "bedrock/openllmetry/test_anthropic_3_completion_string_content.yaml",
        "bedrock",
        Call("bedrock.invoke", _CLAUDE_3_SONNET),
        usage=(
            {
                "header.input": 16,
                "header.output": 19,
                "body.usage.input_tokens": 16,
                "body.usage.output_tokens": 19,
            },
        ),
        charge=(Charge(16, 19),),
        price=("aws", _CLAUDE_3_SONNET),
        kinds=_kinds("invoke", "anthropic"),
    ),
    Recording(
        "bedrock/openllmetry/test_anthropic_3_completion_streaming.yaml",
        "bedrock",
        Call("bedrock.invoke_stream", _CLAUDE_3_SONNET),
        usage=(
            {
                "message_start.message.usage.input_tokens": 16,
                "message_delta.usage.output_tokens": 21,
                "message_stop.amazon-bedrock-invocationMetrics.inputTokenCount": 16,
                "message_stop.amazon-bedrock-invocationMetrics.outputTokenCount": 21,
            },
        ),
        charge=(Charge(16, 21),),
        price=("aws", _CLAUDE_3_SONNET),
        kinds=_kinds("invoke-stream", "anthropic", "event-stream"),
    ),
    Recording(
        "bedrock/openllmetry/test_meta_llama3_completion.yaml",
        "bedrock",
        Call("bedrock.invoke", "meta.llama3-70b-instruct-v1:0"),
        usage=(
            {
                "header.input": 8,
                "header.output": 35,
                "body.prompt_token_count": 8,
                "body.generation_token_count": 35,
            },
        ),
        charge=(Charge(8, 35),),
        price=("aws", "meta.llama3-70b-instruct-v1:0"),
        kinds=_kinds("invoke", "meta"),
    ),
    Recording(
        "bedrock/openllmetry/test_titan_completion.yaml",
        "bedrock",
        Call("bedrock.invoke", _TITAN, options={"region": "ap-south-1"}),
        usage=(
            {
                "header.input": 30,
                "header.output": 29,
                "body.inputTextTokenCount": 30,
                "body.results.0.tokenCount": 29,
            },
        ),
        charge=(Charge(30, 29),),
        price=("aws", _TITAN),
        kinds=_kinds("invoke", "amazon"),
    ),
    Recording(
        "bedrock/openllmetry/test_meta_converse_with_events_with_no_content.yaml",
        "bedrock",
        Call("bedrock.converse", "meta.llama3-2-1b-instruct-v1:0"),
        usage=({"usage.inputTokens": 52, "usage.outputTokens": 30, "usage.totalTokens": 82},),
        charge=(Charge(52, 30),),
        price=("aws", "meta.llama3-2-1b-instruct-v1:0"),
        kinds=_kinds("converse", "meta"),
    ),
    Recording(
        "bedrock/openllmetry/test_guardrail_invoke_stream.yaml",
        "bedrock",
        Call("bedrock.invoke_stream", _TITAN),
        # The guardrail blocked the input: one chunk, token counts as floats (6.0,
        # 3.0), and no amazon-bedrock-invocationMetrics.
        usage=({"chunk.inputTextTokenCount": 6, "chunk.totalOutputTextTokenCount": 3},),
        charge=(Charge(6, 3),),
        price=("aws", _TITAN),
        kinds=_kinds("invoke-stream", "amazon", "event-stream", "guardrail"),
    ),
    Recording(
        "bedrock/openllmetry/test_prompt_cache.yaml",
        "bedrock",
        Call("bedrock.invoke", "anthropic.claude-3-5-haiku-20241022-v1:0", calls=2),
        usage=(
            {
                "header.input": 4,
                "header.output": 50,
                "header.cache_read": 0,
                "header.cache_write": 18131,
                "body.usage.input_tokens": 4,
                "body.usage.cache_creation_input_tokens": 18131,
                "body.usage.cache_read_input_tokens": 0,
                "body.usage.output_tokens": 50,
            },
            {
                "header.input": 4,
                "header.output": 50,
                "header.cache_read": 18131,
                "header.cache_write": 0,
                "body.usage.input_tokens": 4,
                "body.usage.cache_creation_input_tokens": 0,
                "body.usage.cache_read_input_tokens": 18131,
                "body.usage.output_tokens": 50,
            },
        ),
        charge=(Charge(4, 50, cache_write_tokens=18131), Charge(4, 50, cache_read_tokens=18131)),
        price=("aws", "anthropic.claude-3-5-haiku-20241022-v1:0"),
        kinds=_kinds("invoke", "anthropic", "cache"),
    ),
    Recording(
        "bedrock/openllmetry/test_titan_converse_stream.yaml",
        "bedrock",
        Call("bedrock.converse_stream", _TITAN),
        usage=({"usage.inputTokens": 43, "usage.outputTokens": 125, "usage.totalTokens": 168},),
        charge=(Charge(43, 125),),
        price=("aws", _TITAN),
        kinds=_kinds("converse-stream", "amazon", "event-stream", "guardrail"),
    ),
    Recording(
        "bedrock/openllmetry/test_nova_cross_region_invoke_with_events_with_no_content.yaml",
        "bedrock",
        Call("bedrock.invoke", "us.amazon.nova-lite-v1:0"),
        usage=(
            {
                "header.input": 7,
                "header.output": 53,
                "header.cache_read": 0,
                "header.cache_write": 0,
                "body.usage.inputTokens": 7,
                "body.usage.outputTokens": 53,
            },
        ),
        charge=(Charge(7, 53),),
        price=("aws", "us.amazon.nova-lite-v1:0"),
        kinds=_kinds("invoke", "amazon", "cross-region"),
    ),
    Recording(
        "bedrock/openllmetry/test_anthropic_cross_region.yaml",
        "bedrock",
        Call("bedrock.converse", _CROSS_REGION_ARN),
        usage=(
            {
                "usage.inputTokens": 20,
                "usage.outputTokens": 72,
                "usage.totalTokens": 92,
                "usage.cacheReadInputTokens": 0,
                "usage.cacheWriteInputTokens": 0,
            },
        ),
        charge=(Charge(20, 72),),
        price=("aws", _CROSS_REGION_ARN),
        kinds=_kinds("converse", "anthropic", "cross-region", "arn", "guardrail"),
    ),
    Recording(
        "bedrock/pydantic-ai/TestBedrock.test_titan_v2_minimal.yaml",
        "bedrock",
        Call("bedrock.invoke", "amazon.titan-embed-text-v2:0"),
        usage=({"header.input": 5, "body.inputTextTokenCount": 5},),
        charge=(Charge(5, 0),),
        price=("aws", "amazon.titan-embed-text-v2:0"),
        kinds=_kinds("invoke", "amazon", "embeddings"),
    ),
    Recording(
        "bedrock/pydantic-ai/test_bedrock_model_stream.yaml",
        "bedrock",
        Call("bedrock.converse_stream", "amazon.nova-micro-v1:0"),
        usage=({"usage.inputTokens": 13, "usage.outputTokens": 82, "usage.totalTokens": 95},),
        charge=(Charge(13, 82),),
        price=("aws", "amazon.nova-micro-v1:0"),
        kinds=_kinds("converse-stream", "amazon", "event-stream"),
    ),
    Recording(
        "bedrock/pydantic-ai/test_bedrock_native_output_mistral.yaml",
        "bedrock",
        Call("bedrock.converse", "mistral.mistral-large-3-675b-instruct"),
        usage=({"usage.inputTokens": 21, "usage.outputTokens": 26, "usage.totalTokens": 47},),
        charge=(Charge(21, 26),),
        price=("aws", "mistral.mistral-large-3-675b-instruct"),
        kinds=_kinds("converse", "mistral"),
    ),
    Recording(
        "bedrock/pydantic-ai/test_bedrock_model_service_tier.yaml",
        "bedrock",
        Call("bedrock.converse", "us.amazon.nova-micro-v1:0"),
        # The request asks for serviceTier default, the response says flex; genai-prices
        # has no tier prices for Bedrock, so the price is the same at any tier.
        usage=({"usage.inputTokens": 13, "usage.outputTokens": 5, "usage.totalTokens": 18},),
        charge=(Charge(13, 5),),
        price=("aws", "us.amazon.nova-micro-v1:0"),
        kinds=_kinds("converse", "amazon", "cross-region", "service-tier"),
    ),
    Recording(
        "bedrock/pydantic-ai/test_bedrock_cache_write_and_read.yaml",
        "bedrock",
        Call("bedrock.converse", _SONNET_4_5, calls=2),
        usage=(
            {
                "usage.inputTokens": 2,
                "usage.outputTokens": 5,
                "usage.totalTokens": 1329,
                "usage.cacheReadInputTokens": 0,
                "usage.cacheWriteInputTokens": 1322,
            },
            {
                "usage.inputTokens": 2,
                "usage.outputTokens": 5,
                "usage.totalTokens": 1329,
                "usage.cacheReadInputTokens": 1322,
                "usage.cacheWriteInputTokens": 0,
            },
        ),
        charge=(Charge(2, 5, cache_write_tokens=1322), Charge(2, 5, cache_read_tokens=1322)),
        price=("aws", _SONNET_4_5),
        kinds=_kinds("converse", "anthropic", "cross-region", "cache"),
    ),
    Recording(
        "bedrock/pydantic-ai/test_anthropic_cache_bedrock_real_api.yaml",
        "bedrock",
        # Anthropic's Messages body on Bedrock (InvokeModel), EU cross-region profile.
        Call("bedrock.invoke", _HAIKU_4_5_EU, calls=2, options={"region": "eu-central-1"}),
        usage=(
            {
                "header.input": 3,
                "header.output": 1944,
                "header.cache_read": 9511,
                "header.cache_write": 0,
                "body.usage.input_tokens": 3,
                "body.usage.output_tokens": 1944,
                "body.usage.cache_read_input_tokens": 9511,
                "body.usage.cache_creation_input_tokens": 0,
            },
            {
                "header.input": 3,
                "header.output": 44,
                "header.cache_read": 9511,
                "header.cache_write": 1956,
                "body.usage.input_tokens": 3,
                "body.usage.output_tokens": 44,
                "body.usage.cache_read_input_tokens": 9511,
                "body.usage.cache_creation_input_tokens": 1956,
            },
        ),
        charge=(
            Charge(3, 1944, cache_read_tokens=9511),
            Charge(3, 44, cache_read_tokens=9511, cache_write_tokens=1956),
        ),
        price=("aws", _HAIKU_4_5_EU),
        kinds=_kinds("invoke", "anthropic", "cross-region", "cache"),
    ),
    Recording(
        "bedrock/pydantic-ai/test_bedrock_model_thinking_part_stream.yaml",
        "bedrock",
        Call("bedrock.converse_stream", "us.anthropic.claude-sonnet-4-20250514-v1:0"),
        usage=({"usage.inputTokens": 36, "usage.outputTokens": 73, "usage.totalTokens": 109},),
        charge=(Charge(36, 73),),
        price=("aws", "us.anthropic.claude-sonnet-4-20250514-v1:0"),
        kinds=_kinds("converse-stream", "anthropic", "cross-region", "event-stream", "thoughts"),
    ),
    Recording(
        "bedrock/pydantic-ai/test_bedrock_native_output_stream.yaml",
        "bedrock",
        Call("bedrock.converse_stream", _SONNET_4_5),
        usage=({"usage.inputTokens": 210, "usage.outputTokens": 18, "usage.totalTokens": 228},),
        charge=(Charge(210, 18),),
        price=("aws", _SONNET_4_5),
        kinds=_kinds("converse-stream", "anthropic", "cross-region", "event-stream"),
    ),
    Recording(
        "bedrock/pydantic-ai/test_bedrock_model_stream_empty_text_delta.yaml",
        "bedrock",
        Call("bedrock.converse_stream", "openai.gpt-oss-120b-1:0"),
        usage=({"usage.inputTokens": 70, "usage.outputTokens": 43, "usage.totalTokens": 113},),
        charge=(Charge(70, 43),),
        price=("aws", "openai.gpt-oss-120b-1:0"),
        kinds=_kinds("converse-stream", "openai", "event-stream"),
    ),
    Recording(
        "bedrock/pydantic-ai/test_bedrock_model_code_execution_tool_stream.yaml",
        "bedrock",
        Call("bedrock.converse_stream", "us.amazon.nova-2-lite-v1:0"),
        # Nova's built-in code interpreter; serverToolUsage is empty.
        usage=({"usage.inputTokens": 1002, "usage.outputTokens": 59, "usage.totalTokens": 1061},),
        charge=(Charge(1002, 59),),
        price=("aws", "us.amazon.nova-2-lite-v1:0"),
        kinds=_kinds("converse-stream", "amazon", "cross-region", "event-stream", "server-tool"),
    ),
    Recording(
        "bedrock/crewai/test_bedrock_async_basic_call.yaml",
        "bedrock",
        Call("bedrock.converse", "us.anthropic.claude-3-5-sonnet-20241022-v2:0"),
        usage=({"usage.inputTokens": 9, "usage.outputTokens": 10, "usage.totalTokens": 19},),
        charge=(Charge(9, 10),),
        price=("aws", "us.anthropic.claude-3-5-sonnet-20241022-v2:0"),
        kinds=_kinds("converse", "anthropic", "cross-region"),
    ),
)

MISTRAL = (
    Recording(
        "mistral/openllmetry/test_mistralai_chat_legacy.yaml",
        "mistral",
        Call("mistral.complete", "mistral-tiny"),
        usage=(
            {"usage.prompt_tokens": 11, "usage.completion_tokens": 96, "usage.total_tokens": 107},
        ),
        charge=(Charge(11, 96),),
        price=("mistral", "mistral-tiny"),
        kinds=_kinds("chat", "gzip"),
    ),
    Recording(
        "mistral/openllmetry/test_mistralai_async_chat_legacy.yaml",
        "mistral",
        Call("mistral.acomplete", "mistral-tiny"),
        usage=(
            {"usage.prompt_tokens": 11, "usage.completion_tokens": 99, "usage.total_tokens": 110},
        ),
        charge=(Charge(11, 99),),
        price=("mistral", "mistral-tiny"),
        kinds=_kinds("chat", "async", "gzip"),
    ),
    Recording(
        "mistral/openllmetry/test_mistralai_streaming_chat_with_events_with_content.yaml",
        "mistral",
        Call("mistral.stream", "mistral-tiny"),
        usage=(
            {"usage.prompt_tokens": 11, "usage.completion_tokens": 49, "usage.total_tokens": 60},
        ),
        charge=(Charge(11, 49),),
        price=("mistral", "mistral-tiny"),
        kinds=_kinds("stream"),
    ),
    Recording(
        "mistral/openllmetry/test_mistral_embeddings_legacy.yaml",
        "mistral",
        Call("mistral.embed", "mistral-embed"),
        usage=(
            {"usage.prompt_tokens": 10, "usage.completion_tokens": 0, "usage.total_tokens": 10},
        ),
        charge=(Charge(10, 0),),
        price=("mistral", "mistral-embed"),
        kinds=_kinds("embeddings", "gzip"),
    ),
    Recording(
        "mistral/pydantic-ai/test_mistral_forwards_penalties.yaml",
        "mistral",
        Call("mistral.complete", "mistral-large-latest"),
        usage=(
            {
                "usage.prompt_tokens": 4,
                "usage.completion_tokens": 36,
                "usage.total_tokens": 40,
                "usage.prompt_tokens_details.cached_tokens": 0,
            },
        ),
        charge=(Charge(4, 36),),
        price=("mistral", "mistral-large-latest"),
        kinds=_kinds("chat"),
    ),
    Recording(
        "mistral/pydantic-ai/test_mistral_history_uses_prompt_cache.yaml",
        "mistral",
        Call("mistral.complete", "mistral-large-latest", calls=2),
        # The second turn reads 224 of its 268 prompt tokens from Mistral's prompt cache.
        usage=(
            {
                "usage.prompt_tokens": 253,
                "usage.completion_tokens": 5,
                "usage.total_tokens": 258,
                "usage.prompt_tokens_details.cached_tokens": 0,
            },
            {
                "usage.prompt_tokens": 268,
                "usage.completion_tokens": 5,
                "usage.total_tokens": 273,
                "usage.prompt_tokens_details.cached_tokens": 224,
            },
        ),
        charge=(Charge(253, 5), Charge(44, 5, cache_read_tokens=224)),
        price=("mistral", "mistral-large-latest"),
        kinds=_kinds("chat", "cache"),
    ),
)

GROQ = (
    Recording(
        "groq/openllmetry/test_chat_streaming_with_events_with_no_content.yaml",
        "groq",
        Call("groq.stream", "llama3-8b-8192"),
        usage=(
            {
                "x_groq.usage.prompt_tokens": 18,
                "x_groq.usage.completion_tokens": 73,
                "x_groq.usage.total_tokens": 91,
            },
        ),
        charge=(Charge(18, 73),),
        price=("groq", "llama3-8b-8192"),
        kinds=_kinds("stream"),
    ),
    Recording(
        "groq/pydantic-ai/test_extra_headers.yaml",
        "groq",
        Call("groq.create", "llama-3.3-70b-versatile"),
        usage=(
            {"usage.prompt_tokens": 48, "usage.completion_tokens": 8, "usage.total_tokens": 56},
        ),
        charge=(Charge(48, 8),),
        price=("groq", "llama-3.3-70b-versatile"),
        kinds=_kinds("chat"),
    ),
    Recording(
        "groq/pydantic-ai/test_groq_native_output.yaml",
        "groq",
        Call("groq.create", "openai/gpt-oss-120b"),
        usage=(
            {"usage.prompt_tokens": 178, "usage.completion_tokens": 94, "usage.total_tokens": 272},
        ),
        charge=(Charge(178, 94),),
        price=("groq", "openai/gpt-oss-120b"),
        kinds=_kinds("chat", "reasoning"),
    ),
    Recording(
        "groq/pydantic-ai/test_groq_prompted_output.yaml",
        "groq",
        Call("groq.create", "openai/gpt-oss-120b"),
        usage=(
            {
                "usage.prompt_tokens": 183,
                "usage.completion_tokens": 92,
                "usage.total_tokens": 275,
                "usage.completion_tokens_details.reasoning_tokens": 69,
            },
        ),
        charge=(Charge(183, 92, reasoning_tokens=69),),
        price=("groq", "openai/gpt-oss-120b"),
        kinds=_kinds("chat", "reasoning"),
    ),
    Recording(
        "groq/pydantic-ai/test_groq_model_instructions.yaml",
        "groq",
        Call("groq.create", "llama-3.3-70b-versatile"),
        usage=(
            {"usage.prompt_tokens": 48, "usage.completion_tokens": 8, "usage.total_tokens": 56},
        ),
        charge=(Charge(48, 8),),
        price=("groq", "llama-3.3-70b-versatile"),
        kinds=_kinds("chat"),
    ),
)

_OPENAI_ROUTE = {"route": "openai"}
_GEMINI_ROUTE = {"route": "gemini"}

LITELLM = (
    Recording(
        "litellm/crewai/test_litellm_async_basic_call.yaml",
        "litellm",
        Call("litellm.acompletion", "gpt-4o-mini", options=_OPENAI_ROUTE),
        usage=(
            {
                "usage.prompt_tokens": 9,
                "usage.completion_tokens": 9,
                "usage.total_tokens": 18,
                "usage.prompt_tokens_details.cached_tokens": 0,
                "usage.completion_tokens_details.reasoning_tokens": 0,
            },
        ),
        charge=(Charge(9, 9),),
        price=("openai", "gpt-4o-mini"),
        kinds=_kinds("openai-route", "async"),
    ),
    Recording(
        "litellm/crewai/test_litellm_async_streaming.yaml",
        "litellm",
        Call("litellm.astream", "gpt-4o-mini", options=_OPENAI_ROUTE),
        usage=(
            {
                "usage.prompt_tokens": 10,
                "usage.completion_tokens": 4,
                "usage.total_tokens": 14,
                "usage.prompt_tokens_details.cached_tokens": 0,
            },
        ),
        charge=(Charge(10, 4),),
        price=("openai", "gpt-4o-mini"),
        kinds=_kinds("openai-route", "async", "stream"),
    ),
    Recording(
        "litellm/crewai/test_litellm_async_with_system_message.yaml",
        "litellm",
        Call("litellm.completion", "gpt-4o-mini", options=_OPENAI_ROUTE),
        usage=(
            {"usage.prompt_tokens": 24, "usage.completion_tokens": 8, "usage.total_tokens": 32},
        ),
        charge=(Charge(24, 8),),
        price=("openai", "gpt-4o-mini"),
        kinds=_kinds("openai-route"),
    ),
    Recording(
        "litellm/crewai/test_gemini_models[gemini-gemini-2.0-flash-001].yaml",
        "litellm",
        Call("litellm.completion", "gemini-2.0-flash-001", options=_GEMINI_ROUTE),
        usage=({"usage.prompt_tokens": 7, "usage.completion_tokens": 9, "usage.total_tokens": 16},),
        charge=(Charge(7, 9),),
        price=("google", "gemini-2.0-flash-001"),
        kinds=_kinds("gemini-route", "gzip"),
    ),
    Recording(
        "litellm/crewai/test_gemini_models[gemini-gemini-2.5-flash-preview-04-17].yaml",
        "litellm",
        Call("litellm.acompletion", "gemini-2.5-flash-preview-04-17", options=_GEMINI_ROUTE),
        usage=(
            {
                "usage.prompt_tokens": 8,
                "usage.completion_tokens": 87,
                "usage.total_tokens": 95,
                "usage.completion_tokens_details.reasoning_tokens": 79,
            },
        ),
        charge=(Charge(8, 87, reasoning_tokens=79),),
        price=("google", "gemini-2.5-flash-preview-04-17"),
        kinds=_kinds("gemini-route", "async", "gzip", "thoughts"),
    ),
)

RECORDINGS: tuple[Recording, ...] = GEMINI + BEDROCK + MISTRAL + GROQ + LITELLM
PROVIDERS = ("gemini", "bedrock", "mistral", "groq", "litellm")


def priced(provider_id: str, model: str, charge: Charge) -> Decimal:
    """``charge`` priced by genai-prices itself at :data:`PRICED_AT`, rounded up to 1e-9.

    Needs ``genai_prices`` (the tests that call it skip without it).
    """
    import genai_prices

    usage = genai_prices.Usage(
        input_tokens=charge.input_tokens + charge.cache_read_tokens + charge.cache_write_tokens,
        output_tokens=charge.output_tokens,
        cache_read_tokens=charge.cache_read_tokens or None,
        cache_write_tokens=charge.cache_write_tokens or None,
        **charge.media,
    )
    price = genai_prices.calc_price(
        usage, model, provider_id=provider_id, genai_request_timestamp=PRICED_AT
    )
    return Decimal(price.total_price).quantize(Decimal("1e-9"), rounding=ROUND_CEILING)


def _get(usage: Mapping[str, int], *keys: str) -> int:
    """The first of ``keys`` present in ``usage``, else 0."""
    for key in keys:
        if key in usage:
            return usage[key]
    return 0


def _ends(usage: Mapping[str, int], suffix: str) -> int:
    """The count under the one key ending with ``suffix``, else 0."""
    found = [value for key, value in usage.items() if key.endswith(suffix)]
    return found[-1] if found else 0


def charge_of(call: Call, usage: Mapping[str, int]) -> Charge:
    """The tokens to charge for ``usage`` as the SDK exposed it, by the module's rules.

    An executable statement of the rules in the module docstring, checked against the
    ``charge`` column of every recording.
    """
    if call.sdk == "genai":
        prompt = _get(usage, "prompt_token_count")
        cached = _get(usage, "cached_content_token_count")
        tool = _get(usage, "tool_use_prompt_token_count")
        thoughts = _get(usage, "thoughts_token_count")
        total = _get(usage, "total_token_count")
        output = (
            total - prompt - tool if total else _get(usage, "candidates_token_count") + thoughts
        )
        return Charge(prompt - cached + tool, output, cached, 0, thoughts)
    if call.driver in ("bedrock.converse", "bedrock.converse_stream"):
        return Charge(
            _get(usage, "usage.inputTokens"),
            _get(usage, "usage.outputTokens"),
            _get(usage, "usage.cacheReadInputTokens"),
            _get(usage, "usage.cacheWriteInputTokens"),
        )
    if call.driver == "bedrock.invoke":
        return Charge(
            _get(usage, "header.input"),
            _get(usage, "header.output"),
            _get(usage, "header.cache_read"),
            _get(usage, "header.cache_write"),
        )
    if call.driver == "bedrock.invoke_stream":
        metrics = "amazon-bedrock-invocationMetrics."
        if any(metrics in key for key in usage):
            return Charge(
                _ends(usage, metrics + "inputTokenCount"),
                _ends(usage, metrics + "outputTokenCount"),
                _ends(usage, metrics + "cacheReadInputTokenCount"),
                _ends(usage, metrics + "cacheWriteInputTokenCount"),
            )
        return Charge(
            _ends(usage, "inputTextTokenCount"), _ends(usage, "totalOutputTextTokenCount")
        )
    prefix = "x_groq.usage." if any(key.startswith("x_groq.") for key in usage) else "usage."
    cached = _get(usage, prefix + "prompt_tokens_details.cached_tokens")
    return Charge(
        _get(usage, prefix + "prompt_tokens") - cached,
        _get(usage, prefix + "completion_tokens"),
        cached,
        0,
        _get(usage, prefix + "completion_tokens_details.reasoning_tokens"),
    )
