"""botocore's side of Bedrock: the guarded HTTP session of one client's endpoint.

:class:`GuardedSession` sees every attempt of every call: it reserves, sends, and wraps
the response body in :class:`MeteredRaw`, which hands the bytes on unchanged while their
usage is tracked. A refusal is raised from the session as the client's own modeled
exception that is also the payi_guard refusal (:func:`refusal`), which botocore's retry
handlers never retry.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from payi_guard.context import get_context
from payi_guard.engine import CallRequest, Guard
from payi_guard.exceptions import (
    BudgetExceeded,
    PayiGuardError,
    StorageError,
    UnknownModelRefused,
)
from payi_guard.meter.options import MeterOptions
from payi_guard.meter.providers.bedrock_wire import DIALECT, PROVIDER
from payi_guard.meter.providers.meter import WireStreamState, media_type, split_path
from payi_guard.meter.providers.wire import WireEndpoint
from payi_guard.meter.streams import DECODABLE_ENCODINGS, _Inflater, _settle_finalizer
from payi_guard.meter.transport import UNKNOWN_MODEL

__all__ = ["GuardedSession", "MeteredRaw", "refusal"]

_ERROR_CODES: Final = (
    (BudgetExceeded, "ThrottlingException", 429),
    (UnknownModelRefused, "AccessDeniedException", 403),
    (StorageError, "ServiceUnavailableException", 503),
)


def refusal(exceptions: Any, exc: PayiGuardError, operation: str) -> BaseException:
    """The client's modeled exception that is also the payi_guard refusal.

    Args:
        exceptions: the client's ``client.exceptions``.
        exc: the refusal.
        operation: the operation name (``Converse``...), for the error message.
    """
    from botocore.exceptions import ClientError

    code, status = "ValidationException", 400
    for cls, name, http_status in _ERROR_CODES:
        if isinstance(exc, cls):
            code, status = name, http_status
            break
    message = exc.describe() if isinstance(exc, BudgetExceeded) else str(exc)
    error_response = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": {}, "RetryAttempts": 0},
    }
    sdk_class = getattr(exceptions, code, None) or ClientError
    error = sdk_class(error_response, operation)
    combined: BaseException = type(error).__new__(_combined(type(error), type(exc)), *error.args)
    combined.__dict__.update(exc.__dict__)
    combined.__dict__.update(error.__dict__)
    return combined


_PUBLIC_MODULE: Final = "payi_guard.meter.providers.bedrock"
"""The module the refusal classes name: the one applications import, wherever they are made."""

_combined_lock = threading.Lock()
_combined_classes: weakref.WeakValueDictionary[tuple[type[Any], type[Any]], type[Any]]
_combined_classes = weakref.WeakValueDictionary()


def _combined(sdk_class: type[BaseException], refusal_class: type[PayiGuardError]) -> type[Any]:
    # botocore makes a modeled exception class per client class: kept weakly, so that
    # a discarded client's classes can go.
    key = (sdk_class, refusal_class)
    with _combined_lock:
        cls = _combined_classes.get(key)
        if cls is None:
            name = f"{refusal_class.__name__}As{sdk_class.__name__}"
            cls = type(
                name,
                (sdk_class, refusal_class),
                {"__module__": _PUBLIC_MODULE, "__qualname__": name},
            )
            _combined_classes[key] = cls
        return cls


_OPERATION_NAMES: Final = {
    "converse": "Converse",
    "converse-stream": "ConverseStream",
    "invoke": "InvokeModel",
    "invoke-with-response-stream": "InvokeModelWithResponseStream",
}


@dataclass(frozen=True, slots=True)
class _Planned:
    endpoint: WireEndpoint
    call: CallRequest


class MeteredRaw:
    """A botocore response's ``raw`` body, read through while its usage is tracked.

    botocore reads an event stream with :meth:`stream`, a JSON body through ``content``
    (also :meth:`stream`) and an ``invoke_model`` body with :meth:`read` /
    :meth:`readinto`. The bytes are handed on unchanged; the reservation is settled at
    the body's end, at an exception event, at :meth:`close`, on a read error, or when
    the object is collected.
    """

    def __init__(self, raw: Any, state: WireStreamState) -> None:
        self._raw = raw
        self._state = state
        self._finalizer = _settle_finalizer(self, state)
        self._ended = False

    def preloaded(self, content: bytes) -> None:
        """Meter a body read before it was wrapped.

        botocore reads every body that does not stream inside its session.
        """
        self._state.feed(content)
        self._end()

    def _settle(self, reason: str) -> None:
        self._finalizer.detach()
        self._state.settle(reason)

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._state.end()
            self._settle("end")

    def stream(self, amt: int = 2**16, decode_content: bool | None = None) -> Iterator[bytes]:
        """The body in chunks, as urllib3's ``stream``."""
        state = self._state
        errors = state.tracker.errors
        try:
            for chunk in self._raw.stream(amt, decode_content=decode_content):
                state.feed(chunk)
                if errors:
                    # An exception event ends an event stream: botocore raises it and
                    # reads no further, while the app may keep the response.
                    self._settle("error")
                yield chunk
        except Exception:
            self._settle("error")
            raise
        self._end()

    def read(self, amt: int | None = None, *args: Any, **kwargs: Any) -> bytes:
        """Read like urllib3's ``read``."""
        try:
            data: bytes = self._raw.read(amt, *args, **kwargs)
        except Exception:
            self._settle("error")
            raise
        if data:
            self._state.feed(data)
        if amt is None or not data:
            self._end()
        return data

    def readinto(self, buffer: Any) -> int:
        """Read into ``buffer`` like urllib3's ``readinto``."""
        try:
            size: int = self._raw.readinto(buffer)
        except Exception:
            self._settle("error")
            raise
        if size:
            self._state.feed(bytes(memoryview(buffer)[:size]))
        elif len(buffer):
            self._end()
        return size

    def readlines(self) -> list[bytes]:
        """The rest of the body, split into lines."""
        return self.read().splitlines(keepends=True)

    def close(self) -> None:
        """Close the body; a body not read to its end is settled as cut short."""
        try:
            self._raw.close()
        finally:
            self._settle("close")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class GuardedSession:
    """botocore's HTTP session for one client, guarding its Bedrock calls.

    Args:
        inner: the session botocore built (a ``URLLib3Session``).
        guard: the guard.
        options: the options of the ``wrap`` / ``instrument`` call.
        exceptions: the client's ``client.exceptions`` (refusals are raised as them).
    """

    def __init__(self, inner: Any, guard: Guard, options: MeterOptions, exceptions: Any) -> None:
        self.inner = inner
        self.guard = guard
        self.options = options
        self._exceptions = exceptions

    def _plan(self, request: Any) -> _Planned | None:
        from urllib.parse import urlsplit

        url = urlsplit(str(request.url))
        endpoint = DIALECT.classify(
            str(request.method).upper(), (url.hostname or "").lower(), split_path(url.path)
        )
        body = request.body
        if endpoint is None or not isinstance(body, (bytes, bytearray)):
            return None
        try:
            parsed: Any = json.loads(body) if body else {}
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(parsed, dict):
            return None
        wire = DIALECT.describe(endpoint, parsed, self.options.estimate_mode)
        call = CallRequest(
            model=wire.model or UNKNOWN_MODEL,
            provider=self.options.provider or PROVIDER,
            endpoint=endpoint.kind,
            input_tokens=wire.input_tokens,
            max_output_tokens=wire.output_tokens,
            stream=wire.stream,
            cache_writes=wire.cache_writes,
        )
        return _Planned(endpoint, call)

    def send(self, request: Any) -> Any:
        """Send one attempt: reserve, send, wrap the body (or refuse, or release)."""
        planned = self._plan(request)
        if planned is None:
            return self.inner.send(request)
        try:
            reservation = self.guard.begin(planned.call, get_context())
        except PayiGuardError as exc:
            operation = _OPERATION_NAMES[planned.endpoint.operation]
            raise refusal(self._exceptions, exc, operation) from None
        try:
            response = self.inner.send(request)
        except BaseException:
            reservation.release(outcome="error")
            raise
        if not 200 <= int(response.status_code) < 300:
            reservation.release(outcome="error")
            return response
        headers = response.headers
        encoding = str(headers.get("content-encoding") or "").strip().lower()
        inflater = None
        if encoding in DECODABLE_ENCODINGS:
            inflater = _Inflater("deflate" if encoding == "deflate" else "gzip")
        tracker = DIALECT.tracker(planned.endpoint, media_type(headers), headers)
        state = WireStreamState(
            reservation,
            tracker,
            fallback_input=planned.call.input_tokens,
            max_output=planned.call.max_output_tokens,
            inflater=inflater,
            raw=bool(encoding) and encoding != "identity" and inflater is None,
            forward_decoded=False,
        )
        raw = MeteredRaw(response.raw, state)
        response.raw = raw
        content = getattr(response, "_content", None)
        if isinstance(content, bytes):
            raw.preloaded(content)
        return response

    def close(self) -> None:
        """Close the inner session."""
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
