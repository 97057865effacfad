"""Views: sync and async, plain and streamed; each GenAI call is charged to request.user."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

from django.contrib.auth import login as django_login
from django.contrib.auth.models import User
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST
from openai.types.chat import ChatCompletionMessageParam

from chatsite import llm
from payi_guard import get_context
from payi_guard.django import get_guard


def _prompt(request: HttpRequest) -> str:
    if request.method == "POST" and request.body:
        return str(json.loads(request.body).get("prompt", "Hello"))
    return request.GET.get("prompt", "Hello")


def _messages(prompt: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": prompt}]


@csrf_exempt
@require_POST
def login(request: HttpRequest) -> HttpResponse:
    """Stand-in for a login form: signs in ``{"username": ...}``, created on first sight.

    A real site checks a password or an SSO assertion; what matters here is that Django's
    own ``login()`` puts the user in the session, so ``request.user`` names them.
    """
    username = str(json.loads(request.body or b"{}").get("username", ""))
    if not username:
        return JsonResponse({"error": "username is required"}, status=400)
    user, _ = User.objects.get_or_create(username=username)
    django_login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    return JsonResponse({"username": username, "pk": user.pk})


@require_GET
def whoami(request: HttpRequest) -> HttpResponse:
    """Who Django says the user is, and who the guard charges."""
    user = request.user
    return JsonResponse(
        {
            "username": user.get_username() if user.is_authenticated else None,
            "pk": user.pk,
            "charged_as": get_context().user_id,
        }
    )


@require_GET
def visit(request: HttpRequest) -> HttpResponse:
    """Count visits in the session: gives an anonymous visitor a Django session."""
    request.session["visits"] = request.session.get("visits", 0) + 1
    return JsonResponse({"visits": request.session["visits"]})


@csrf_exempt
@require_POST
def chat(request: HttpRequest) -> HttpResponse:
    """A sync view (Django runs it in a thread under ASGI)."""
    reply = llm.client().chat.completions.create(
        model=llm.MODEL, messages=_messages(_prompt(request)), max_tokens=50
    )
    return JsonResponse(
        {"reply": reply.choices[0].message.content, "charged_as": get_context().user_id}
    )


@csrf_exempt
@require_POST
async def achat(request: HttpRequest) -> HttpResponse:
    """An async view (Django runs it in an event loop of its own under WSGI)."""
    async with llm.async_client() as client:
        reply = await client.chat.completions.create(
            model=llm.MODEL, messages=_messages(_prompt(request)), max_tokens=50
        )
    return JsonResponse(
        {"reply": reply.choices[0].message.content, "charged_as": get_context().user_id}
    )


@require_GET
def stream(request: HttpRequest) -> StreamingHttpResponse:
    """Server-sent events from a sync generator: the call is made while the body streams."""
    prompt = _prompt(request)

    def events() -> Iterator[str]:
        with llm.client().chat.completions.create(
            model=llm.MODEL, messages=_messages(prompt), max_tokens=50, stream=True
        ) as chunks:
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield f"data: {chunk.choices[0].delta.content}\n\n"
        yield f"data: [DONE] charged_as={get_context().user_id}\n\n"

    return StreamingHttpResponse(events(), content_type="text/event-stream")


@require_GET
async def astream(request: HttpRequest) -> StreamingHttpResponse:
    """Server-sent events from an async generator."""
    prompt = _prompt(request)

    async def events() -> AsyncIterator[str]:
        async with llm.async_client() as client:
            chunks = await client.chat.completions.create(
                model=llm.MODEL, messages=_messages(prompt), max_tokens=50, stream=True
            )
            async with chunks:
                async for chunk in chunks:
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield f"data: {chunk.choices[0].delta.content}\n\n"
        yield f"data: [DONE] charged_as={get_context().user_id}\n\n"

    return StreamingHttpResponse(events(), content_type="text/event-stream")


@require_GET
def usage(request: HttpRequest) -> HttpResponse:
    """The current user's limits (the anonymous bucket without a user)."""
    user_id = str(request.user.pk) if request.user.is_authenticated else None
    return JsonResponse([limit.as_dict() for limit in get_guard().usage(user_id)], safe=False)
