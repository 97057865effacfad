"""Print a set-up command from README.md: `demo` or `tests`.

README.md marks each of its two commands with an HTML comment on the line before the
fenced block: ``<!-- command: demo -->`` and ``<!-- command: tests -->``.
"""

from __future__ import annotations

import pathlib
import sys


def command(name: str) -> str:
    """Return the shell command README.md marks with ``<!-- command: name -->``."""
    lines = pathlib.Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()
    lines_list = lines.splitlines()
    marker = f"<!-- command: {name} -->"
    for index, line in enumerate(lines_list):
        if line.strip() == marker:
            fence = lines_list[index + 1].strip()
            if not fence.startswith("```"):
                break
            body = []
            for inner in lines_list[index + 2 :]:
                if inner.strip().startswith("```"):
                    return "\n".join(body).strip()
                body.append(inner)
    raise SystemExit(f"README.md has no fenced block after {marker!r}")


if __name__ == "__main__":
    print(command(sys.argv[1] if len(sys.argv) > 1 else "tests"))
