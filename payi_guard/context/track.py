"""``track_context`` and ``@track``: attribution layers, validated and nested.

Nesting rules: ``None`` inherits, ``""``/``[]``/``{}`` clear, scalars: the inner value
wins, ``limit_ids``: the ordered union, properties: merged, inner keys win.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import AsyncGenerator, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType, TracebackType
from typing import Any, ParamSpec, TypeVar, cast

from payi_guard.context.scope import (
    _EMPTY,
    _ROOT,
    _SCALARS,
    Attribution,
    _Frame,
    _frames,
    get_context,
)
from payi_guard.identity import DEFAULT_MAX_LENGTH, normalize_user_id

__all__ = ["track", "track_context"]

P = ParamSpec("P")
R = TypeVar("R")


def _normalize_limit_ids(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence):
        raise TypeError(f"limit_ids must be a list of strings, not {type(value).__name__}")
    out: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item:
            raise TypeError("limit_ids must contain non-empty strings")
        if item not in out:
            out.append(item)
    return tuple(out)


def _check_properties(name: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict, not {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be strings")
    return value


@dataclass(frozen=True, slots=True)
class _Layer:
    """One validated set of keyword arguments, ready to merge onto a snapshot."""

    values: Mapping[str, Any]

    @classmethod
    def build(cls, kwargs: Mapping[str, Any]) -> _Layer:
        values: dict[str, Any] = {}
        for name, value in kwargs.items():
            if value is None:
                continue
            if name == "user_id":
                if callable(value):
                    raise TypeError(
                        "user_id must be a value, not a callable: a callable given to "
                        "@track is evaluated once, when the module is imported, so every "
                        "call would be charged to the same user. Name the user per request "
                        "with `with track_context(user_id=get_current_user_id()):` "
                        "or set_user() instead."
                    )
                values[name] = (
                    "" if value == "" else normalize_user_id(value, max_length=DEFAULT_MAX_LENGTH)
                )
            elif name == "use_case_version":
                if value != "" and (isinstance(value, bool) or not isinstance(value, int)):
                    raise TypeError(f"use_case_version must be an int, not {type(value).__name__}")
                values[name] = value
            elif name in _SCALARS:
                if not isinstance(value, str):
                    raise TypeError(f"{name} must be a string, not {type(value).__name__}")
                values[name] = value
            elif name == "limit_ids":
                values[name] = _normalize_limit_ids(value)
            elif name in ("request_properties", "use_case_properties"):
                values[name] = MappingProxyType(dict(_check_properties(name, value)))
            else:  # pragma: no cover - guarded by the keyword-only signatures
                raise TypeError(f"unknown attribution keyword {name!r}")
        return cls(values)

    def apply(self, frame: _Frame) -> _Frame:
        if not self.values:
            return frame
        base = frame.attribution
        user_cleared = frame.user_cleared
        if "user_id" in self.values:
            user_cleared = self.values["user_id"] == ""
        updates: dict[str, Any] = {}
        for name, value in self.values.items():
            if name in _SCALARS:
                updates[name] = None if value == "" else value
            elif name == "limit_ids":
                if not value:
                    updates[name] = ()
                else:
                    merged = list(base.limit_ids)
                    merged.extend(i for i in value if i not in merged)
                    updates[name] = tuple(merged)
            else:
                if not value:
                    updates[name] = _EMPTY
                else:
                    outer: Mapping[str, Any] = getattr(base, name)
                    updates[name] = MappingProxyType({**outer, **value})
        return _Frame(replace(base, **updates), user_cleared)


class track_context:
    """Attribute every GenAI call inside the block (sync ``with`` or ``async with``).

    Example::

        with track_context(user_id="acme:alice", use_case_name="summarize"):
            client.chat.completions.create(...)

    Args:
        user_id: the user charged (``str``, ``int`` or ``UUID``; ``org:user`` rolls up to
            the org).
        account_name: Pay-i account name.
        use_case_name: Pay-i use case name.
        use_case_id: Pay-i use case instance id.
        use_case_version: Pay-i use case version.
        use_case_step: Pay-i use case step.
        limit_ids: extra named limits to charge (merged with outer ones).
        request_properties: properties merged into the outer ones.
        use_case_properties: properties merged into the outer ones.

    Raises:
        InvalidUserId: ``user_id`` is not a valid user id.
        TypeError: a keyword has the wrong type, or ``user_id`` is a callable.
    """

    __slots__ = ("_layer", "_tokens")

    def __init__(
        self,
        *,
        user_id: object = None,
        account_name: str | None = None,
        use_case_name: str | None = None,
        use_case_id: str | None = None,
        use_case_version: int | None = None,
        use_case_step: str | None = None,
        limit_ids: Sequence[str] | None = None,
        request_properties: Mapping[str, Any] | None = None,
        use_case_properties: Mapping[str, Any] | None = None,
    ) -> None:
        self._layer = _Layer.build(
            {
                "user_id": user_id,
                "account_name": account_name,
                "use_case_name": use_case_name,
                "use_case_id": use_case_id,
                "use_case_version": use_case_version,
                "use_case_step": use_case_step,
                "limit_ids": limit_ids,
                "request_properties": request_properties,
                "use_case_properties": use_case_properties,
            }
        )
        # One object may be entered by overlapping tasks and threads: each entry's token
        # is kept under the frame it set (a new frame every time), which its own context
        # still holds when it exits.
        self._tokens: dict[int, contextvars.Token[_Frame]] = {}

    def __enter__(self) -> Attribution:
        before = _frames.get()
        frame = self._layer.apply(before)
        if frame is not before:  # an empty layer changes nothing: nothing to undo
            self._tokens[id(frame)] = _frames.set(frame)
        return get_context()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._layer.values:
            return
        token = self._tokens.pop(id(_frames.get()), None)
        if token is None:  # the block set another frame and left it: undo the latest
            token = self._tokens.popitem()[1]
        try:
            _frames.reset(token)
        except ValueError:
            # Entered in another copy of the context: a generator that a server steps in
            # a fresh copy each time (Starlette's StreamingResponse, Django under ASGI)
            # left the block in a later step. That copy is discarded after the step: put
            # back what the block replaced there, never fail the app's response.
            _frames.set(token.old_value if token.old_value is not token.MISSING else _ROOT)

    async def __aenter__(self) -> Attribution:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def track(
    *,
    user_id: object = None,
    account_name: str | None = None,
    use_case_name: str | None = None,
    use_case_id: str | None = None,
    use_case_version: int | None = None,
    use_case_step: str | None = None,
    limit_ids: Sequence[str] | None = None,
    request_properties: Mapping[str, Any] | None = None,
    use_case_properties: Mapping[str, Any] | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function so every GenAI call it makes carries static attribution.

    Works on sync, async, generator and async-generator functions; for generators the
    attribution is active during each step only, never between them.

    The keywords are those of :class:`track_context`. The values are fixed when the
    module is imported: name a per-request user with :class:`track_context` or
    :func:`set_user`, not here.

    Raises:
        TypeError: ``user_id`` is a callable (it would be evaluated once, at import), or
            another keyword has the wrong type.
        InvalidUserId: ``user_id`` is not a valid user id.
    """
    kwargs: dict[str, Any] = {
        "user_id": user_id,
        "account_name": account_name,
        "use_case_name": use_case_name,
        "use_case_id": use_case_id,
        "use_case_version": use_case_version,
        "use_case_step": use_case_step,
        "limit_ids": limit_ids,
        "request_properties": request_properties,
        "use_case_properties": use_case_properties,
    }
    _Layer.build(kwargs)  # validate now, at decoration time

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        if inspect.isasyncgenfunction(fn):
            agen_fn = cast(Callable[..., AsyncGenerator[Any, Any]], fn)
            return cast(Callable[P, R], _tracked_async_generator(agen_fn, kwargs))

        if inspect.isgeneratorfunction(fn):
            gen_fn = cast(Callable[..., Generator[Any, Any, Any]], fn)

            @functools.wraps(fn)
            def gen_wrapper(*args: Any, **kw: Any) -> Generator[Any, Any, Any]:
                return (yield from _drive_generator(gen_fn(*args, **kw), kwargs))

            return cast(Callable[P, R], gen_wrapper)

        if inspect.iscoroutinefunction(fn):
            coro_fn = cast(Callable[..., Any], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kw: Any) -> Any:
                async with track_context(**kwargs):
                    return await coro_fn(*args, **kw)

            return cast(Callable[P, R], async_wrapper)

        @functools.wraps(fn)
        def sync_wrapper(*args: P.args, **kw: P.kwargs) -> R:
            with track_context(**kwargs):
                result = fn(*args, **kw)
            # A coroutine function behind a plain decorator looks sync: what it returns
            # runs later, inside the attribution too.
            if inspect.iscoroutine(result):
                return cast(R, _tracked_coroutine(result, kwargs))
            if inspect.isgenerator(result):
                return cast(R, _drive_generator(result, kwargs))
            return result

        return sync_wrapper

    return decorate


async def _tracked_coroutine(coro: Any, kwargs: Mapping[str, Any]) -> Any:
    """Await ``coro`` inside the attribution."""
    async with track_context(**kwargs):
        return await coro


def _drive_generator(
    gen: Generator[Any, Any, Any], kwargs: Mapping[str, Any]
) -> Generator[Any, Any, Any]:
    """Run each step of ``gen`` inside the attribution, and nothing in between."""
    to_send: Any = None
    to_throw: BaseException | None = None
    while True:
        try:
            with track_context(**kwargs):
                if to_throw is not None:
                    exc, to_throw = to_throw, None
                    item = gen.throw(exc)
                else:
                    item = gen.send(to_send)
        except StopIteration as stop:
            return stop.value
        try:
            to_send = yield item
        except GeneratorExit:
            with track_context(**kwargs):
                gen.close()
            raise
        except BaseException as exc:  # forwarded into the wrapped generator
            to_throw = exc


def _tracked_async_generator(
    fn: Callable[..., AsyncGenerator[Any, Any]], kwargs: Mapping[str, Any]
) -> Callable[..., AsyncGenerator[Any, Any]]:
    """Async twin of :func:`_drive_generator`, forwarding ``asend`` and ``athrow``."""

    @functools.wraps(fn)
    async def forwarding(*args: Any, **kw: Any) -> AsyncGenerator[Any, Any]:
        agen = fn(*args, **kw)
        to_send: Any = None
        to_throw: BaseException | None = None
        try:
            while True:
                try:
                    async with track_context(**kwargs):
                        if to_throw is not None:
                            exc, to_throw = to_throw, None
                            item = await agen.athrow(exc)
                        else:
                            item = await agen.asend(to_send)
                except StopAsyncIteration:
                    return
                try:
                    to_send = yield item
                except GeneratorExit:
                    raise
                except BaseException as exc:  # forwarded into the wrapped generator
                    to_throw = exc
        finally:
            async with track_context(**kwargs):
                await agen.aclose()

    return forwarding
