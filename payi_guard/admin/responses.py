"""What the users app's routes share: problem responses and bounded request bodies."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import Response

from payi_guard.web.problem import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_BASE, Problem

__all__ = ["problem", "read_limited"]


def problem(
    status: int,
    slug: str,
    title: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    **members: object,
) -> Response:
    """An ``application/problem+json`` response (RFC 9457).

    Args:
        status: the HTTP status.
        slug: the end of the problem's ``type`` URN.
        title: its title.
        detail: what happened, for people.
        headers: extra response headers.
        **members: extra members of the document.
    """
    document = {
        "type": PROBLEM_TYPE_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        **members,
    }
    built = Problem.build(status, document, (headers or {}).items())
    return Response(
        built.body, status, headers=dict(built.headers), media_type=PROBLEM_CONTENT_TYPE
    )


async def read_limited(request: Request, limit: int) -> bytes | None:
    """The request body, or ``None`` as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
