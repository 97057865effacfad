"""Metering of the other GenAI SDKs: Gemini, Bedrock, Mistral, Groq and LiteLLM.

Each SDK is metered where its bytes flow, as OpenAI and Anthropic are: the guarding
transport on its httpx / httpx2 clients (``google-genai``, ``mistralai``, ``groq``, and
LiteLLM's own HTTP clients), or a guarded HTTP session on botocore's endpoint (``boto3``
``bedrock-runtime``). One module per SDK:

* :mod:`~payi_guard.meter.providers.gemini`: ``google-genai`` (``payi-guard[gemini]``);
* :mod:`~payi_guard.meter.providers.bedrock`: ``boto3`` ``bedrock-runtime``
  (``payi-guard[bedrock]``), with :mod:`~payi_guard.meter.providers.eventstream`;
* :mod:`~payi_guard.meter.providers.mistral`: ``mistralai`` (``payi-guard[mistral]``);
* :mod:`~payi_guard.meter.providers.groq`: ``groq`` (``payi-guard[groq]``);
* :mod:`~payi_guard.meter.providers.litellm`: the LiteLLM SDK (``payi-guard[litellm]``).

:mod:`~payi_guard.meter.providers.wire` holds the pure wire-format pieces and
:mod:`~payi_guard.meter.providers.meter` the transport decisions they share.

No SDK is imported here or at import of the modules above: an SDK is imported only
when a client of it is wrapped, or by ``instrument()`` when it is installed. Naming an
SDK that is not installed (``guard.instrument(sdks=["gemini"])``) raises
:class:`~payi_guard.exceptions.MissingDependency` naming the extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any, Final

from payi_guard.engine import Guard
from payi_guard.exceptions import MissingDependency
from payi_guard.meter.options import MeterOptions

__all__ = [
    "EXTRAS",
    "SDK_MODULES",
    "guarded_by",
    "http_client_of",
    "installed",
    "instrument",
    "uninstrument",
    "wrap",
]

SDK_MODULES: Final[Mapping[str, str]] = {
    "gemini": "google.genai",
    "bedrock": "botocore",
    "mistral": "mistralai",
    "groq": "groq",
    "litellm": "litellm",
}
"""The module each provider SDK is imported as, by the name ``sdks=`` accepts."""

EXTRAS: Final[Mapping[str, str]] = {
    "gemini": "gemini",
    "bedrock": "bedrock",
    "mistral": "mistral",
    "groq": "groq",
    "litellm": "litellm",
}
"""The ``payi-guard[...]`` extra that installs each SDK."""

_ORDER: Final = ("gemini", "bedrock", "mistral", "groq", "litellm")


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"payi_guard.meter.providers.{name}")


def installed(name: str) -> bool:
    """Whether the SDK of provider ``name`` is importable (it is not imported)."""
    root = SDK_MODULES[name]
    try:
        return importlib.util.find_spec(root) is not None
    except (ImportError, ValueError):
        return False


def _sdk_of(client: object) -> str | None:
    """The provider SDK a client object belongs to (never imports anything)."""
    for cls in type(client).__mro__:
        module = cls.__module__
        if module.startswith("google.genai"):
            return "gemini"
        root = module.partition(".")[0]
        if root in ("botocore", "boto3"):
            return "bedrock"
        if root == "mistralai":
            return "mistral"
        if root in ("groq", "litellm"):
            return root
    return None


def wrap(guard: Guard, client: Any, options: Mapping[str, Any]) -> bool:
    """Guard a provider SDK client; ``False`` when ``client`` is none of theirs.

    Raises:
        TypeError: the client belongs to a provider SDK but cannot be guarded (a boto3
            client of another service), or an option is unknown.
        ValueError: an option value is out of range.
    """
    name = _sdk_of(client)
    if name is None:
        return False
    meter_options = MeterOptions.from_kwargs(options, refusal="sdk")
    _module(name).wrap(guard, client, meter_options)
    return True


def instrument(guard: Guard, options: MeterOptions, sdks: Iterable[str] | None = None) -> list[str]:
    """Instrument every installed provider SDK (or those named in ``sdks``).

    Returns:
        The SDKs instrumented.

    Raises:
        MissingDependency: an SDK named in ``sdks`` is not installed.
        ValueError: ``sdks`` names an unknown SDK.
    """
    if sdks is None:
        names = [name for name in _ORDER if installed(name)]
    else:
        names = list(dict.fromkeys(sdks))
        unknown = sorted(set(names) - set(SDK_MODULES))
        if unknown:
            raise ValueError(f"unknown SDK(s) {', '.join(unknown)}; known: {', '.join(_ORDER)}")
        for name in names:
            if not installed(name):
                raise MissingDependency(SDK_MODULES[name], EXTRAS[name])
    done: list[str] = []
    for name in names:
        _module(name).instrument(guard, options)
        done.append(name)
    return done


def uninstrument(guard: Guard) -> None:
    """Undo :func:`instrument` (the modules never imported have nothing to undo)."""
    for name in _ORDER:
        module = _loaded(name)
        if module is not None:
            module.uninstrument(guard)


def _loaded(name: str) -> ModuleType | None:
    import sys

    return sys.modules.get(f"payi_guard.meter.providers.{name}")


def guarded_by(client: Any) -> Guard | None:
    """The guard of a provider client guarded outside httpx (botocore), else ``None``."""
    if _sdk_of(client) != "bedrock":
        return None
    module = _loaded("bedrock")
    return None if module is None else module.guarded_by(client)


def http_client_of(client: Any) -> Any:
    """The httpx client a provider SDK client sends through (itself for other objects)."""
    name = _sdk_of(client)
    if name is None:
        return client
    module = _loaded(name)
    return None if module is None else module.http_client_of(client)
