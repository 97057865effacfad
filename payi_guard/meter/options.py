"""The options of one ``wrap``/``instrument`` call, shared by the transports it installs."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast

from payi_guard import log as events
from payi_guard.meter.tokens import EstimateMode

__all__ = ["MeterOptions", "RefusalMode", "base_url"]

RefusalMode = Literal["sdk", "raise", "response"]
"""How a refusal reaches the caller: ``sdk`` (synthesized response an SDK hook turns into
the combined exception), ``raise`` (the payi_guard exception itself), ``response``
(an ``application/problem+json`` response)."""

_INCLUDE_USAGE_SUFFIXES: Final = ("/chat/completions", "/completions")

_log = events.get_logger()


@dataclass
class MeterOptions:
    """What one ``wrap``/``instrument`` call asked for (shared by the transports it made).

    Attributes:
        include_usage: inject ``stream_options.include_usage`` into chat and legacy
            completions streams (False: never).
        skip_include_usage: URL prefixes (``"http://llm.internal:8000/v1"``) where the
            option is never injected.
        retry_without_stream_options: resend once without the option when a server
            answers 400/422 naming ``stream_options``, and remember the base URL.
        provider: the provider name to charge under, instead of detecting it.
        payi: the Pay-i bridge: True, False, or None (on while Pay-i is instrumented).
        estimate_mode: how input text is bounded (see
            :func:`payi_guard.meter.tokens.estimate_input_tokens`).
        refusal: how a refusal reaches the caller (:data:`RefusalMode`).
    """

    include_usage: bool = True
    skip_include_usage: tuple[str, ...] = ()
    retry_without_stream_options: bool = True
    provider: str | None = None
    payi: bool | None = None
    estimate_mode: EstimateMode = "ratio"
    refusal: RefusalMode = "raise"
    _learned: set[str] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any], *, refusal: RefusalMode) -> MeterOptions:
        """Validate the keyword options of ``wrap`` / ``instrument``.

        Args:
            options: the keyword arguments (see :func:`payi_guard.meter.wrap`).
            refusal: the refusal mode of the client kind: ``sdk`` for SDK clients (not
                changeable), ``raise`` for plain HTTP clients (``response`` allowed).

        Raises:
            TypeError: an unknown option, or a value of the wrong type.
            ValueError: a value out of range.
        """
        known = {
            "include_usage",
            "skip_include_usage",
            "retry_without_stream_options",
            "provider",
            "payi",
            "estimate_mode",
            "refusal",
        }
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        include_usage = options.get("include_usage", True)
        retry = options.get("retry_without_stream_options", True)
        for name, value in (
            ("include_usage", include_usage),
            ("retry_without_stream_options", retry),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, not {value!r}")
        skip = options.get("skip_include_usage", ())
        if isinstance(skip, str):
            skip = (skip,)
        if not isinstance(skip, Iterable) or not all(isinstance(s, str) and s for s in skip):
            raise TypeError("skip_include_usage must be a list of URL prefixes")
        provider = options.get("provider")
        if provider is not None and (not isinstance(provider, str) or not provider):
            raise TypeError("provider must be a non-empty string")
        payi = options.get("payi")
        if payi is not None and not isinstance(payi, bool):
            raise TypeError("payi must be True, False or None")
        mode = options.get("estimate_mode", "ratio")
        if mode not in ("ratio", "bytes"):
            raise ValueError(f"estimate_mode must be 'ratio' or 'bytes', not {mode!r}")
        chosen = options.get("refusal", refusal)
        if refusal == "sdk":
            if chosen != "sdk":
                raise ValueError(
                    "refusal cannot be changed for an SDK client: refusals always arrive "
                    "as the SDK's own exception classes"
                )
        elif chosen not in ("raise", "response"):
            raise ValueError(
                f"refusal must be 'raise' or 'response' for a plain HTTP client, not {chosen!r}"
            )
        return cls(
            include_usage=include_usage,
            skip_include_usage=tuple(s.rstrip("/") for s in skip),
            retry_without_stream_options=retry,
            provider=provider,
            payi=payi,
            estimate_mode=cast(EstimateMode, mode),
            refusal=cast(RefusalMode, chosen),
        )

    def injects_for(self, url: Any) -> bool:
        """Whether a chat / completions stream sent to ``url`` gets ``include_usage``."""
        if not self.include_usage:
            return False
        if self.skip_include_usage:
            text = str(url)
            if any(text.startswith(prefix) for prefix in self.skip_include_usage):
                return False
        with self._lock:
            return not self._learned or base_url(url) not in self._learned

    def learn_no_stream_options(self, base: str) -> None:
        """Remember that the server at ``base`` refuses ``stream_options``."""
        with self._lock:
            self._learned.add(base)
        _log.warning(
            "stream_options_refused",
            base_url=base,
            detail="the server refused stream_options; its streams are now sent unchanged "
            "and charged from the streamed output",
        )

    @property
    def refusing_stream_options(self) -> frozenset[str]:
        """The base URLs learned to refuse ``stream_options``."""
        with self._lock:
            return frozenset(self._learned)


def base_url(url: Any) -> str:
    """The base URL of a request URL: its path without the chat / completions suffix."""
    path: str = url.path
    for suffix in _INCLUDE_USAGE_SUFFIXES:
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{url.host}{port}{path}"
