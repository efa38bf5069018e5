#!/usr/bin/env python3
"""Does this interpreter's environment hold exactly the pins of a lock file? Exit 0 if so.

Run with the venv's Python: ``.venv/bin/python scripts/venv_matches.py requirements/main.txt``.
Prints each package that is missing or has another version than pinned (local labels such as
``+cpu`` are ignored), and checks that ``jipfed`` is the editable install of this checkout.
Packages the lock does not name (e.g. the nvidia-* wheels of a CUDA torch) are not an error.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: Path) -> dict[str, str]:
    """``{project: version}`` from ``name==version`` lines."""
    found = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            found[canonical(name)] = version.strip()
    return found


def mismatches(wanted: dict[str, str]) -> list[str]:
    """What differs between ``wanted`` and the installed distributions, one line each."""
    have = {canonical(d.metadata["Name"]): d.version.split("+", 1)[0] for d in metadata.distributions()}
    problems = [
        f"{name}: pinned {version}, installed {have.get(name, 'nothing')}"
        for name, version in sorted(wanted.items())
        if have.get(name) != version
    ]
    spec = importlib.util.find_spec("jipfed")
    if spec is None or spec.origin is None or not Path(spec.origin).resolve().is_relative_to(ROOT):
        problems.append(f"jipfed: not the editable install of {ROOT}")
    return problems


def main() -> int:
    lock = Path(sys.argv[1])
    problems = mismatches(pins(lock))
    for problem in problems:
        print(f"[setup] {sys.prefix} vs {lock}: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
