"""The fake provider itself: :class:`FakeProvider`, its lifecycle, scripts and records."""

from __future__ import annotations

import copy
import threading
from types import TracebackType
from typing import Literal

from payi_guard.testing.fake_provider.handler import Handler, Server
from payi_guard.testing.fake_provider.script import DEFAULT_REPLY, RecordedRequest, Scripted
from payi_guard.testing.fake_provider.wire import Plan

__all__ = ["FakeProvider"]


class FakeProvider:
    """A threaded local HTTP server that answers like OpenAI and Anthropic.

    Use it as a context manager (or call :meth:`start` / :meth:`stop`). It binds
    ``127.0.0.1`` on an ephemeral port; handler threads are daemons, so a forgotten
    server never blocks interpreter exit.

    Args:
        reply: the reply text of every generated answer.
        gzip: compress bodies (JSON and streams) when the request's ``Accept-Encoding``
            allows gzip, as real servers do.
        chunk_delay: seconds to wait before each stream event (slow mode).
        reject_stream_options: answer 400 to any request carrying ``stream_options``,
            like OpenAI-compatible servers that do not know the option.
        embedding_dimensions: the vector size when a request gives no ``dimensions``.
        anthropic_delta_usage: the default of :attr:`Scripted.anthropic_delta_usage`.
        retry_after: seconds announced in ``retry-after`` on 429 answers (a fraction of
            a second is sent as ``retry-after-ms`` too, so SDK retries stay fast).
        host: the interface to bind.
        port: the port to bind; 0 picks a free one.
    """

    def __init__(
        self,
        *,
        reply: str = DEFAULT_REPLY,
        gzip: bool = True,
        chunk_delay: float = 0.0,
        reject_stream_options: bool = False,
        embedding_dimensions: int = 8,
        anthropic_delta_usage: Literal["full", "output"] = "full",
        retry_after: float = 1.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if chunk_delay < 0:
            raise ValueError(f"chunk_delay must not be negative, got {chunk_delay}")
        if embedding_dimensions < 1:
            raise ValueError(f"embedding_dimensions must be at least 1, got {embedding_dimensions}")
        if retry_after < 0:
            raise ValueError(f"retry_after must not be negative, got {retry_after}")
        self.reply = reply
        self.gzip = gzip
        self.chunk_delay = chunk_delay
        self.reject_stream_options = reject_stream_options
        self.embedding_dimensions = embedding_dimensions
        self.anthropic_delta_usage = anthropic_delta_usage
        self.retry_after = retry_after
        self._host = host
        self._port = port
        self._lock = threading.Condition()
        self._queue: list[Scripted] = []
        self._defaults: dict[str, Scripted] = {}
        self._records: list[RecordedRequest] = []
        self._server: Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> FakeProvider:
        """Start serving in a background thread; returns ``self``.

        Raises:
            RuntimeError: if it is already running.
        """
        if self._server is not None:
            raise RuntimeError("FakeProvider is already running")
        server = Server((self._host, self._port), Handler, self)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"FakeProvider:{server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every open connection (idempotent)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port.

        Raises:
            RuntimeError: if the server is not running.
        """
        if self._server is None:
            raise RuntimeError("FakeProvider is not running: use it as a context manager")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:{port}``: the Anthropic SDK's and Azure's ``base_url``."""
        return f"http://{self._host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """``{base_url}/v1``: the OpenAI SDK's ``base_url``."""
        return f"{self.base_url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """The Anthropic SDK's ``base_url`` (the SDK adds ``/v1/messages`` itself)."""
        return self.base_url

    # -- control ------------------------------------------------------------------------

    def enqueue(self, *scripts: Scripted) -> None:
        """Script the next responses, in order.

        Each request takes the first queued script that :meth:`Scripted.matches` its path;
        requests with no matching script get the path default, else normal answers.
        """
        with self._lock:
            self._queue.extend(scripts)

    def set_default(self, path: str, script: Scripted | None) -> None:
        """Set how requests for a path are answered when no queued script applies.

        Args:
            path: applies to every request whose path ends with it
                (``"/chat/completions"``).
            script: the answer; ``None`` removes the default.
        """
        with self._lock:
            if script is None:
                self._defaults.pop(path.rstrip("/"), None)
            else:
                self._defaults[path.rstrip("/")] = script

    @property
    def pending(self) -> int:
        """How many queued scripts no request has taken yet."""
        with self._lock:
            return len(self._queue)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot (copies) of every request received so far, oldest first."""
        with self._lock:
            return [copy.copy(record) for record in self._records]

    def clear(self) -> None:
        """Forget recorded requests, queued scripts and path defaults."""
        with self._lock:
            self._records.clear()
            self._queue.clear()
            self._defaults.clear()

    def wait_for(
        self, n: int, timeout: float = 5.0, *, answered: bool = False
    ) -> list[RecordedRequest]:
        """Block until at least ``n`` requests arrived (or were answered).

        Args:
            n: the number of requests to wait for.
            timeout: seconds to wait at most.
            answered: wait until those requests are fully answered (``outcome`` is no
                longer ``"pending"``), not only received.

        Returns:
            The snapshot of :attr:`requests`.

        Raises:
            TimeoutError: if fewer requests arrived in time (the message says how many).
        """

        def ready() -> bool:
            done = self._records
            if answered:
                done = [r for r in done if r.outcome != "pending"]
            return len(done) >= n

        with self._lock:
            if not self._lock.wait_for(ready, timeout=timeout):
                raise TimeoutError(
                    f"waited {timeout}s for {n} request(s), got {len(self._records)}"
                )
            return [copy.copy(record) for record in self._records]

    # -- used by the handler ------------------------------------------------------------

    def _record(self, record: RecordedRequest) -> None:
        with self._lock:
            self._records.append(record)
            self._lock.notify_all()

    def _answering(self, record: RecordedRequest, plan: Plan) -> None:
        with self._lock:
            record.status = plan.status
            record.usage = plan.usage
            record.stream = plan.events is not None

    def _finish(self, record: RecordedRequest, outcome: str) -> None:
        with self._lock:
            record.outcome = outcome
            self._lock.notify_all()

    def _script_for(self, path: str) -> Scripted:
        with self._lock:
            for index, script in enumerate(self._queue):
                if script.matches(path):
                    return self._queue.pop(index)
            stripped = path.rstrip("/")
            for suffix, script in self._defaults.items():
                if stripped.endswith(suffix):
                    return script
        return Scripted()
