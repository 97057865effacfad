"""Attribution context: nesting rules, decorators, request scope, concurrency."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import uuid
from collections.abc import AsyncGenerator, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from payi_guard import (
    ContextThreadPoolExecutor,
    InvalidUserId,
    NoRequestScope,
    bind_context,
    get_context,
    request_scope,
    set_user,
    track,
    track_context,
)

# --- nesting rules -------------------------------------------------------------------


def test_outside_any_context_everything_is_empty() -> None:
    ctx = get_context()
    assert ctx.user_id is None
    assert ctx.limit_ids == ()
    assert dict(ctx.request_properties) == {}
    assert ctx.org_id is None


def test_none_inherits_every_field() -> None:
    with track_context(
        user_id="acme:alice",
        account_name="acct",
        use_case_name="summarize",
        use_case_id="uc-1",
        use_case_version=3,
        use_case_step="draft",
        limit_ids=["proj"],
        request_properties={"a": 1},
        use_case_properties={"b": 2},
    ):
        outer = get_context()
        with track_context():
            assert get_context() == outer
        with track_context(user_id=None, limit_ids=None, request_properties=None):
            assert get_context() == outer


def test_scalars_inner_wins_and_restores() -> None:
    with track_context(user_id="alice", use_case_name="outer", use_case_version=1):
        with track_context(user_id="bob", use_case_name="inner", use_case_version=2):
            ctx = get_context()
            assert (ctx.user_id, ctx.use_case_name, ctx.use_case_version) == ("bob", "inner", 2)
        ctx = get_context()
        assert (ctx.user_id, ctx.use_case_name, ctx.use_case_version) == ("alice", "outer", 1)
    assert get_context().user_id is None


def test_empty_values_clear() -> None:
    with track_context(
        user_id="alice",
        use_case_name="x",
        limit_ids=["a"],
        request_properties={"k": 1},
        use_case_properties={"j": 2},
    ):
        with track_context(
            user_id="",
            use_case_name="",
            limit_ids=[],
            request_properties={},
            use_case_properties={},
        ):
            ctx = get_context()
            assert ctx.user_id is None
            assert ctx.use_case_name is None
            assert ctx.limit_ids == ()
            assert dict(ctx.request_properties) == {}
            assert dict(ctx.use_case_properties) == {}
        assert get_context().limit_ids == ("a",)


def test_limit_ids_ordered_union_without_duplicates() -> None:
    with track_context(limit_ids=["b", "a"]):
        with track_context(limit_ids=["c", "a", "d", "c"]):
            assert get_context().limit_ids == ("b", "a", "c", "d")
        assert get_context().limit_ids == ("b", "a")


def test_dicts_merge_inner_keys_win() -> None:
    with track_context(request_properties={"a": 1, "b": 1}, use_case_properties={"x": 1}):
        with track_context(request_properties={"b": 2, "c": 3}, use_case_properties={"y": 2}):
            ctx = get_context()
            assert dict(ctx.request_properties) == {"a": 1, "b": 2, "c": 3}
            assert dict(ctx.use_case_properties) == {"x": 1, "y": 2}
        assert dict(get_context().request_properties) == {"a": 1, "b": 1}


def test_snapshot_is_immutable_and_detached() -> None:
    props = {"a": 1}
    with track_context(request_properties=props):
        ctx = get_context()
        props["a"] = 99  # mutating the caller's dict afterwards changes nothing
        assert ctx.request_properties["a"] == 1
        with pytest.raises(TypeError):
            ctx.request_properties["a"] = 2  # type: ignore[index]
        with pytest.raises(AttributeError):
            ctx.user_id = "x"  # type: ignore[misc]


def test_composite_ids_expose_org_and_ints_uuids_convert() -> None:
    with track_context(user_id="acme:alice"):
        assert get_context().org_id == "acme"
    with track_context(user_id=42):
        assert get_context().user_id == "42"
    uid = uuid.UUID("12345678-1234-5678-1234-567812345678")
    with track_context(user_id=uid):
        assert get_context().user_id == str(uid)


def test_invalid_user_id_refused_at_entry() -> None:
    with pytest.raises(InvalidUserId):
        track_context(user_id="bad id")
    with pytest.raises(TypeError):
        track_context(limit_ids=[1])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        track_context(request_properties=["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        track_context(use_case_version="three")  # type: ignore[arg-type]


def test_track_context_is_reusable_and_reentrant() -> None:
    ctx = track_context(user_id="alice")
    with ctx:
        with ctx:
            assert get_context().user_id == "alice"
        assert get_context().user_id == "alice"
    assert get_context().user_id is None


async def test_one_track_context_shared_by_overlapping_tasks_and_threads() -> None:
    # A module-level object entered by tasks and threads whose blocks overlap and end in
    # any order: each restores its own context, and nothing stays behind in a thread.
    shared = track_context(user_id="batch", use_case_name="summarize")
    release = [asyncio.Event() for _ in range(4)]

    async def task(i: int) -> str | None:
        async with shared:
            await release[i].wait()
            return get_context().use_case_name

    tasks = [asyncio.create_task(task(i)) for i in range(4)]
    await asyncio.sleep(0)
    for event in release:  # first in, first out: not the order a stack would need
        event.set()
        await asyncio.sleep(0)
    assert await asyncio.gather(*tasks) == ["summarize"] * 4
    assert get_context().use_case_name is None

    gates = [threading.Event() for _ in range(4)]
    errors: list[BaseException] = []

    def job(i: int) -> None:
        try:
            with shared:
                gates[i].wait(timeout=30)
        except BaseException as exc:  # reported below
            errors.append(exc)

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(job, i) for i in range(4)]
        for gate in gates:
            gate.set()
        for future in futures:
            future.result(timeout=30)
        after = pool.submit(lambda: get_context().user_id).result(timeout=30)
    assert errors == []
    assert after is None  # no worker thread kept the attribution


def test_exception_inside_restores_context() -> None:
    with pytest.raises(RuntimeError):
        with track_context(user_id="alice"):
            raise RuntimeError("boom")
    assert get_context().user_id is None


async def test_async_with() -> None:
    async with track_context(user_id="alice", limit_ids=["x"]) as snapshot:
        assert snapshot.user_id == "alice"
        await asyncio.sleep(0)
        assert get_context().limit_ids == ("x",)
    assert get_context().user_id is None


# --- @track -----------------------------------------------------------------------------


def test_track_sync_function() -> None:
    @track(user_id="alice", use_case_name="uc")
    def work(x: int) -> tuple[str | None, str | None, int]:
        ctx = get_context()
        return ctx.user_id, ctx.use_case_name, x

    assert work(3) == ("alice", "uc", 3)
    assert work.__name__ == "work"
    assert get_context().user_id is None


async def test_track_async_function() -> None:
    @track(user_id="alice")
    async def work() -> str | None:
        await asyncio.sleep(0)
        return get_context().user_id

    assert await work() == "alice"
    assert get_context().user_id is None


async def test_track_over_a_coroutine_function_behind_a_plain_decorator() -> None:
    # functools.wraps over an async function gives a sync function returning a
    # coroutine: its body, run when awaited, is attributed too; so is a generator's.
    def logged(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        return wrapper

    @track(user_id="batch-user", use_case_name="digest")
    @logged
    async def digest() -> tuple[str | None, str | None]:
        await asyncio.sleep(0)
        context = get_context()
        return context.user_id, context.use_case_name

    @track(user_id="batch-user")
    @logged
    def rows() -> Generator[str | None, None, None]:
        yield get_context().user_id

    assert await digest() == ("batch-user", "digest")
    assert list(rows()) == ["batch-user"]
    assert get_context().user_id is None


def test_track_generator_active_only_during_steps() -> None:
    @track(user_id="gen-user", limit_ids=["g"])
    def gen() -> Generator[str | None, str, str]:
        received = yield get_context().user_id
        yield f"{get_context().user_id}:{received}"
        return "done"

    g = gen()
    assert next(g) == "gen-user"
    # Between steps the caller sees its own context, not the generator's.
    assert get_context().user_id is None
    with track_context(user_id="caller"):
        assert g.send("hello") == "gen-user:hello"
        assert get_context().user_id == "caller"
    with pytest.raises(StopIteration) as stop:
        next(g)
    assert stop.value.value == "done"


def test_a_with_block_in_a_generator_stepped_in_fresh_copies_of_the_context() -> None:
    # Starlette's StreamingResponse steps a sync generator in a fresh copy of the
    # request's context each time (Django under ASGI too): a block spanning a yield is
    # left in another copy than it was entered in. That must not fail the response;
    # between steps (and after) the caller's context is untouched.
    seen: list[str | None] = []

    def body() -> Generator[str, None, None]:
        with track_context(user_id="acme:batch"):
            seen.append(get_context().user_id)
            yield "a"
            seen.append(get_context().user_id)  # a new copy: the block's frame is gone
            yield "b"

    with track_context(user_id="acme:alice"):
        request = contextvars.copy_context()
        steps = body()
        assert request.copy().run(next, steps) == "a"
        assert request.copy().run(next, steps) == "b"
        with pytest.raises(StopIteration):
            request.copy().run(next, steps)
        assert get_context().user_id == "acme:alice"
    assert seen == ["acme:batch", "acme:alice"]
    # @track enters its context at every step: the way to name a generator's user.
    tracked = track(user_id="acme:batch")(body)()
    assert [request.copy().run(next, tracked) for _ in range(2)] == ["a", "b"]
    assert seen[2:] == ["acme:batch", "acme:batch"]


def test_track_generator_close_and_throw() -> None:
    seen: list[str | None] = []

    @track(user_id="gen-user")
    def gen() -> Generator[int, None, None]:
        try:
            yield 1
            yield 2
        except ValueError:
            seen.append(get_context().user_id)
            yield 99
        finally:
            seen.append(get_context().user_id)

    g = gen()
    next(g)
    assert g.throw(ValueError("x")) == 99
    g.close()
    assert seen == ["gen-user", "gen-user"]
    assert get_context().user_id is None


async def test_track_async_generator() -> None:
    @track(user_id="agen-user")
    async def agen() -> AsyncGenerator[str | None, None]:
        yield get_context().user_id
        await asyncio.sleep(0)
        yield get_context().user_id

    items = []
    async for item in agen():
        assert get_context().user_id is None
        items.append(item)
    assert items == ["agen-user", "agen-user"]


async def test_track_async_generator_asend_athrow_and_close() -> None:
    seen: list[str | None] = []

    @track(user_id="agen-user")
    async def agen() -> AsyncGenerator[str, str]:
        try:
            got = yield "first"
            try:
                yield f"got {got}"
            except KeyError:
                yield f"caught as {get_context().user_id}"
        finally:
            seen.append(get_context().user_id)

    g = agen()
    assert await g.__anext__() == "first"
    assert await g.asend("x") == "got x"
    assert await g.athrow(KeyError("k")) == "caught as agen-user"
    await g.aclose()
    assert seen == ["agen-user"]


def test_callable_user_id_refused_with_advice() -> None:
    def get_current_user_id() -> str:
        return "alice"

    with pytest.raises(TypeError, match="track_context"):
        track(user_id=get_current_user_id)
    with pytest.raises(TypeError, match="track_context"):
        track_context(user_id=get_current_user_id)


def test_track_validates_at_decoration_time() -> None:
    with pytest.raises(InvalidUserId):
        track(user_id="has space")


def test_explicit_context_nests_inside_track() -> None:
    @track(user_id="static", limit_ids=["a"])
    def work() -> tuple[str | None, tuple[str, ...]]:
        with track_context(limit_ids=["b"]):
            ctx = get_context()
            return ctx.user_id, ctx.limit_ids

    assert work() == ("static", ("a", "b"))


# --- request scope and set_user ---------------------------------------------------------


def test_set_user_needs_a_request_scope() -> None:
    with pytest.raises(NoRequestScope, match="GuardMiddleware"):
        set_user("alice")


def test_set_user_fills_the_request_and_track_context_wins() -> None:
    with request_scope(request_id="r-1") as scope:
        assert get_context().user_id is None
        assert set_user("acme:alice") == "acme:alice"
        assert scope.user_id == "acme:alice"
        ctx = get_context()
        assert (ctx.user_id, ctx.org_id, ctx.request_id) == ("acme:alice", "acme", "r-1")
        with track_context(user_id="bob"):
            assert get_context().user_id == "bob"
        with track_context(user_id=""):
            assert get_context().user_id is None
        assert get_context().user_id == "acme:alice"
    assert get_context().user_id is None


def test_set_user_validates() -> None:
    with request_scope():
        with pytest.raises(InvalidUserId):
            set_user("\x00evil")
        assert get_context().user_id is None


def test_claim_checks_as_set_user_does_and_writes_nothing_it_refuses() -> None:
    # claim() is set_user() without the lock, for the code that just opened the scope.
    with request_scope() as scope:
        assert scope.claim(42, source="scope", tier="pro") == "42"
        assert (scope.user_id, scope.tier, scope.source) == ("42", "pro", "scope")
        assert get_context().tier == "pro"
        with pytest.raises(InvalidUserId):
            scope.claim("\x00evil", source="header")
        with pytest.raises(TypeError, match="tier"):
            scope.claim("bob", source="header", tier=["pro"])  # type: ignore[arg-type]
        assert (scope.user_id, scope.tier, scope.source) == ("42", "pro", "scope")
        assert scope.claim("bob", source="resolver") == "bob"
        assert (scope.user_id, scope.tier, scope.source) == ("bob", None, "resolver")


def test_set_user_in_thread_pool_is_visible_to_the_request_afterwards() -> None:
    """What a sync FastAPI dependency does: run in a worker thread on a context copy."""
    with request_scope():
        with ThreadPoolExecutor(max_workers=2) as pool:
            pool.submit(bind_context(set_user), "from-thread").result()
        assert get_context().user_id == "from-thread"


async def test_set_user_from_asyncio_to_thread_is_visible() -> None:
    with request_scope():
        await asyncio.to_thread(set_user, "via-to-thread")
        assert get_context().user_id == "via-to-thread"


async def test_set_user_from_starlette_threadpool_is_visible() -> None:
    from starlette.concurrency import run_in_threadpool

    with request_scope():
        await run_in_threadpool(set_user, "via-starlette")
        assert get_context().user_id == "via-starlette"


def test_plain_submit_loses_context_bind_context_carries_it() -> None:
    with track_context(user_id="alice"):
        with ThreadPoolExecutor(max_workers=1) as pool:
            lost = pool.submit(lambda: get_context().user_id).result()
            kept = pool.submit(bind_context(lambda: get_context().user_id)).result()
    assert lost is None
    assert kept == "alice"


def test_context_thread_pool_executor_carries_context() -> None:
    with ContextThreadPoolExecutor(max_workers=4) as pool:
        with track_context(user_id="alice"):
            first = pool.submit(lambda: get_context().user_id)
        with track_context(user_id="bob"):
            second = pool.submit(lambda: get_context().user_id)
            mapped = list(pool.map(lambda _: get_context().user_id, range(3)))
    assert first.result() == "alice"
    assert second.result() == "bob"
    assert mapped == ["bob", "bob", "bob"]


def test_bound_function_runs_in_many_threads_at_once() -> None:
    barrier = threading.Barrier(8)

    def work() -> str | None:
        barrier.wait(timeout=10)
        with track_context(use_case_name=threading.current_thread().name):
            return get_context().user_id

    with track_context(user_id="alice"):
        bound = bind_context(work)
    threads_out: list[str | None] = []
    lock = threading.Lock()

    def runner() -> None:
        value = bound()
        with lock:
            threads_out.append(value)

    threads = [threading.Thread(target=runner) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert threads_out == ["alice"] * 8


# --- concurrency: no mix-ups --------------------------------------------------------------


async def test_1000_concurrent_tasks_each_see_their_own_user() -> None:
    mixups: list[tuple[str, str | None]] = []

    async def one(i: int) -> None:
        uid = f"org{i % 7}:user{i}"
        async with track_context(user_id=uid, limit_ids=[f"l{i}"]):
            for _ in range(5):
                await asyncio.sleep(0)
                ctx = get_context()
                if ctx.user_id != uid or ctx.limit_ids != (f"l{i}",):
                    mixups.append((uid, ctx.user_id))
            with request_scope():
                set_user(f"scoped{i}")
                with track_context(user_id=""):
                    await asyncio.sleep(0)
                    if get_context().user_id is not None:
                        mixups.append((uid, get_context().user_id))

    await asyncio.gather(*(one(i) for i in range(1000)))
    assert mixups == []
    assert get_context().user_id is None


async def test_1000_concurrent_request_scopes_with_set_user() -> None:
    mixups: list[tuple[str, str | None]] = []

    async def request(i: int) -> None:
        with request_scope(request_id=f"r{i}"):
            await asyncio.sleep(0)
            set_user(f"user{i}")
            for _ in range(3):
                await asyncio.sleep(0)
                ctx = get_context()
                if (ctx.user_id, ctx.request_id) != (f"user{i}", f"r{i}"):
                    mixups.append((f"user{i}", ctx.user_id))

    await asyncio.gather(*(request(i) for i in range(1000)))
    assert mixups == []


def test_32_threads_each_see_their_own_user() -> None:
    barrier = threading.Barrier(32)
    mixups: list[tuple[str, str | None]] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        uid = f"thread-user-{i}"
        with track_context(user_id=uid):
            barrier.wait(timeout=10)
            for _ in range(2000):
                seen = get_context().user_id
                if seen != uid:
                    with lock:
                        mixups.append((uid, seen))
        with request_scope():
            set_user(f"scope-{i}")
            for _ in range(500):
                if get_context().user_id != f"scope-{i}":
                    with lock:
                        mixups.append((f"scope-{i}", get_context().user_id))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert mixups == []


# --- the request snapshot --------------------------------------------------------------


def test_request_snapshot_equals_the_dataclass_built_one() -> None:
    # get_context() builds the common request snapshot without the dataclass __init__;
    # every field must still be set, to the same value.
    from dataclasses import fields

    from payi_guard.context import Attribution
    from payi_guard.context.scope import _request_attribution

    for user_id, request_id, tier in [("alice", "r-1", "pro"), (None, "r-2", None)]:
        fast = _request_attribution(user_id, request_id, tier)
        built = Attribution(user_id=user_id, request_id=request_id, tier=tier)
        assert fast == built
        assert type(fast) is Attribution
        for f in fields(Attribution):
            assert getattr(fast, f.name) == getattr(built, f.name)


def test_request_snapshot_inside_a_request_scope() -> None:
    with request_scope(request_id="req-1"):
        set_user("acme:alice", tier="pro")
        context = get_context()
        assert context.user_id == "acme:alice"
        assert context.tier == "pro"
        assert context.request_id == "req-1"
        assert context.limit_ids == ()
        assert dict(context.request_properties) == {}
        assert get_context() is context  # reused while nothing changed
