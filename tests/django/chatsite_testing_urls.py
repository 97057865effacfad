"""Routes of the served tests: the example's, the same views on paths that are not gated,
and a stream from a provider the test holds open."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import openai
from chatsite import urls as site_urls
from chatsite import views
from django.http import HttpRequest, StreamingHttpResponse
from django.urls import path

from payi_guard.django import get_guard


async def held_stream(request: HttpRequest) -> StreamingHttpResponse:
    """Stream from ``HELD_OPENAI_BASE_URL``, which sends one chunk and waits."""

    async def events() -> AsyncIterator[str]:
        client = openai.AsyncOpenAI(base_url=os.environ["HELD_OPENAI_BASE_URL"], api_key="test")
        async with get_guard().wrap(client) as llm:
            chunks = await llm.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "Tell a long story"}],
                max_tokens=50,
                stream=True,
            )
            async with chunks:
                async for chunk in chunks:
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield f"data: {chunk.choices[0].delta.content}\n\n"

    return StreamingHttpResponse(events(), content_type="text/event-stream")


urlpatterns = [
    *site_urls.urlpatterns,
    path("open/chat", views.chat),
    path("open/stream", views.stream),
    path("open/astream", views.astream),
    path("held/astream", held_stream),
]
