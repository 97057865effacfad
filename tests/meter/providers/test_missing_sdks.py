"""Without the provider SDKs, payi_guard imports and works; naming one says which extra."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SDKS = {
    "gemini": "google.genai",
    "bedrock": "botocore",
    "mistral": "mistralai",
    "groq": "groq",
    "litellm": "litellm",
}
BLOCKED = ("google.genai", "boto3", "botocore", "mistralai", "groq", "litellm")

PRELUDE = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = __BLOCKED__

    def blocked(name):
        return any(name == b or name.startswith(b + ".") for b in BLOCKED)

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if blocked(name):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    if __HIDE__:
        sys.meta_path.insert(0, Blocker())
    """
)

BODY = textwrap.dedent(
    """
    import httpx2, openai
    from payi_guard import Guard
    from payi_guard.exceptions import MissingDependency

    guard = Guard({"default": [{"max": 1, "per": "day"}]})
    guard.wrap(httpx2.Client())
    guard.wrap(openai.OpenAI(api_key="k"))
    errors = {}
    if __HIDE__:
        for name in __SDKS__:
            try:
                guard.instrument(sdks=[name])
            except MissingDependency as exc:
                errors[name] = str(exc)
            else:
                guard.uninstrument()
    guard.instrument()
    guard.uninstrument()
    loaded = sorted(m for m in sys.modules if blocked(m))
    print(json.dumps({"errors": errors, "loaded": loaded}))
    """
)


def fill(template: str, *, hide: bool) -> str:
    return (
        template.replace("__BLOCKED__", repr(BLOCKED))
        .replace("__HIDE__", repr(hide))
        .replace("__SDKS__", repr(list(SDKS)))
    )


def run(*, hide: bool) -> dict[str, object]:
    script = fill(PRELUDE + BODY, hide=hide)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_without_the_provider_sdks_the_guard_works_and_names_the_extra() -> None:
    result = run(hide=True)
    assert result["loaded"] == []
    errors = result["errors"]
    assert isinstance(errors, dict)
    assert sorted(errors) == sorted(SDKS)
    for name, module in SDKS.items():
        assert f"pip install 'payi-guard[{name}]'" in errors[name]
        assert repr(module) in errors[name]


def test_instrument_waits_for_the_application_to_import_an_sdk() -> None:
    script = fill(PRELUDE, hide=False) + textwrap.dedent(
        """
        import httpx2
        from payi_guard import Guard
        guard = Guard({"default": [{"max": 1, "per": "day"}]})
        guard.wrap(httpx2.Client())
        guard.instrument()
        imported_by_instrument = sorted(m for m in sys.modules if blocked(m))
        import groq._base_client
        patched = hasattr(groq._base_client.BaseClient._build_request, "__wrapped__")
        guard.uninstrument()
        restored = not hasattr(groq._base_client.BaseClient._build_request, "__wrapped__")
        finders = [type(f).__name__ for f in sys.meta_path if "payi_guard" in type(f).__module__]
        print(json.dumps([imported_by_instrument, patched, restored, finders]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    imported, patched, restored, finders = json.loads(done.stdout.strip().splitlines()[-1])
    assert imported == []  # instrument() imported none of the provider SDKs
    assert patched  # groq was patched when the application imported it
    assert restored
    assert finders == []  # nothing left waiting on imports
