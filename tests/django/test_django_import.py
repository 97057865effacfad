"""payi_guard.django imports nothing of Django until Django builds the middleware."""

from __future__ import annotations

import subprocess
import sys


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_importing_payi_guard_django_imports_no_django() -> None:
    result = run(
        "import sys, payi_guard.django\n"
        "loaded = sorted(m for m in sys.modules if m == 'django' or m.startswith('django.'))\n"
        "print(loaded)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_without_django_the_error_names_the_extra() -> None:
    # Hide Django as an environment without it would: the import raises ImportError.
    result = run(
        "import sys\n"
        "sys.modules['django'] = None\n"
        "from payi_guard.django import GuardMiddleware\n"
        "try:\n"
        "    GuardMiddleware(lambda request: None)\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "MissingDependency 'django' is not installed: install it with "
        "`pip install 'payi-guard[django]'`"
    )
