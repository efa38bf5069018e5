#!/usr/bin/env python3
"""Refresh the pinned dependency sets in ``requirements/*.txt`` from their ``*.in`` inputs.

Usage (from the repository root, with the Python the venvs are made from: CPython 3.11)::

    python3 scripts/lock.py                                     # every set, freshly resolved
    python3 scripts/lock.py --from-venv main=.venv airflow2=.venv-af2   # pin what these venvs hold

A set is made in two steps: (1) pip installs ``requirements/<set>.in`` into a throwaway venv (or,
with ``--from-venv``, an existing tested venv is used) and ``pip check`` must pass; (2) pip resolves
the ``.in`` again, dry-run, constrained by what that venv holds (and by the earlier sets named in
``SETS``, less what the ``.in`` pins itself), which yields exactly the set's closure. Constraining later sets by earlier ones gives the
worker stack (torch, MONAI, the DICOM libraries) the same versions in every venv and in the worker
image. Local version labels are dropped (``torch 2.13.0+cpu`` is written ``torch==2.13.0``): the
same line takes a CPU build from a CPU wheel index and the CUDA build from PyPI.
After a refresh run ``make test``: ``scripts/setup.sh`` notices the changed pins and re-syncs.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements"
PROJECT = "jip-federated"

#: set name -> the earlier sets that constrain it (resolution order is this dict's order).
SETS: dict[str, list[str]] = {
    "main": [],
    "worker": ["main"],
    "airflow2": ["worker"],
    "scheduler": ["airflow2"],
}


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pip(python: Path | str, *args: str) -> str:
    """Run ``python -m pip args`` in the repository root; its standard output."""
    done = subprocess.run([str(python), "-m", "pip", *args], cwd=ROOT, check=True, text=True,
                          stdout=subprocess.PIPE)
    return done.stdout


def own_pins(name: str) -> set[str]:
    """Projects that ``requirements/<name>.in`` pins itself (``name==version``): they win over constraints."""
    lines = (line.split("#", 1)[0].strip() for line in (REQUIREMENTS / f"{name}.in").read_text().splitlines())
    return {canonical(line.split("==", 1)[0]) for line in lines if "==" in line}


def constraint_args(name: str, constraints: list[str], tmp: Path) -> list[str]:
    """``-c`` arguments for the earlier sets ``constraints``, minus what ``<name>.in`` pins itself."""
    mine = own_pins(name)
    args = []
    for constraint in constraints:
        kept = [
            line
            for line in (REQUIREMENTS / f"{constraint}.txt").read_text().splitlines()
            if line.startswith("#") or canonical(line.split("==", 1)[0]) not in mine
        ]
        path = tmp / f"{constraint}.constraints.txt"
        path.write_text("\n".join(kept) + "\n")
        args += ["-c", str(path)]
    return args


def installed_versions(venv: Path, name: str, constraints: list[str]) -> str:
    """``pip freeze`` of ``venv``; first a fresh install of ``<name>.in`` there when it has no Python."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"[lock] {name}: installing requirements/{name}.in into {venv} (pip's own resolution)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip(python, "install", "--quiet", "-r", str(REQUIREMENTS / f"{name}.in"), *constraints)
    pip(python, "check")
    return pip(python, "freeze", "--all", "--exclude-editable")


def resolve(name: str, constraints: list[str], venv: Path) -> dict[str, str]:
    """``{project: version}`` of ``requirements/<name>.in``'s closure, pinned to what ``venv`` holds."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        earlier = constraint_args(name, constraints, tmp)
        frozen = tmp / "frozen.txt"
        frozen.write_text(re.sub(r"\+[\w.]+$", "", installed_versions(venv, name, earlier), flags=re.M))
        report = tmp / "report.json"
        pip(sys.executable, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
            "-r", str(REQUIREMENTS / f"{name}.in"), "-c", str(frozen), *earlier)
        installs = json.loads(report.read_text())["install"]
    pins = {}
    for item in installs:
        meta = item["metadata"]
        project = canonical(meta["name"])
        if project != PROJECT:
            pins[project] = meta["version"].split("+", 1)[0]
    return pins


def write_lock(name: str, pins: dict[str, str], constraints: list[str]) -> Path:
    """Write ``requirements/<name>.txt``: a header saying how it was made, then ``name==version``."""
    source = f"requirements/{name}.in" + "".join(f" -c requirements/{c}.txt" for c in constraints)
    header = [
        f"# Pinned by scripts/lock.py from {source}; do not edit by hand.",
        f"# Resolved for CPython {platform.python_version()} on {sys.platform} {platform.machine()}.",
    ]
    lines = [f"{project}=={version}" for project, version in sorted(pins.items())]
    path = REQUIREMENTS / f"{name}.txt"
    path.write_text("\n".join(header + lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="*", metavar="SET", help=f"sets to refresh: {', '.join(SETS)} (default: all)")
    parser.add_argument("--from-venv", nargs="+", default=[], metavar="SET=VENV",
                        help="pin what an existing, tested venv holds instead of a fresh install")
    args = parser.parse_args(argv)
    venvs = dict(item.split("=", 1) for item in args.from_venv)
    wanted = args.sets or list(SETS)
    unknown = sorted((set(wanted) | set(venvs)) - set(SETS))
    if unknown:
        parser.error(f"unknown set(s) {', '.join(unknown)}; known: {', '.join(SETS)}")
    scratch = Path(tempfile.mkdtemp(prefix="jipfed-lock-"))
    for name, constraints in SETS.items():
        if name not in wanted and not set(constraints) & set(wanted):
            continue
        wanted.append(name)
        venv = Path(venvs[name]).resolve() if name in venvs else scratch / name
        pins = resolve(name, constraints, venv)
        path = write_lock(name, pins, constraints)
        print(f"[lock] {path.relative_to(ROOT)}: {len(pins)} packages")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
