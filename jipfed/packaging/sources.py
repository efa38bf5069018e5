"""The suite's own wheel and its pinned dependency sets (``requirements/<set>.txt``, by scripts/lock.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

from jipfed.packaging import source_root

#: What the wheel is built from (setup.py's packages and package_dir).
WHEEL_SOURCES = ("setup.py", "pyproject.toml", "jipfed", "operators", "plugins", "dags")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def build_wheel(dest: Path) -> Path:
    """Build the jip-federated wheel into ``dest`` from a copy of the sources; returns its path."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    with tempfile.TemporaryDirectory(prefix="jipfed-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in WHEEL_SOURCES:
            path = source_root() / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=ignore)
            else:
                shutil.copy2(path, src / name)
        built = Path(tmp) / "wheel"
        cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
               "--wheel-dir", str(built), str(src)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building the jip-federated wheel failed:\n{result.stderr[-3000:]}")
        (wheel,) = built.glob("jip_federated-*.whl")
        return Path(shutil.copy2(wheel, dest / wheel.name))


def base_requirements(wheel: Path) -> list[str]:
    """Project names the wheel requires without extras (what the scheduler needs)."""
    with zipfile.ZipFile(wheel) as archive:
        (meta_name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(meta_name).decode())
    names = []
    for requirement in metadata.get_all("Requires-Dist") or []:
        if "extra ==" not in requirement.replace('"', "").replace("'", ""):
            names.append(_NAME.match(requirement.strip()).group(0))
    return names


def locked(set_name: str) -> list[str]:
    """The ``name==version`` lines of ``requirements/<set_name>.txt``."""
    path = source_root() / "requirements" / f"{set_name}.txt"
    if not path.is_file():
        raise ValueError(f"{path} is missing: run `python3 scripts/lock.py {set_name}` to pin that set")
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line]


def pin_name(line: str) -> str:
    """Canonical project name of one requirement line."""
    match = _NAME.match(line)
    if not match:
        raise ValueError(f"not a requirement line: {line!r}")
    return canonical(match.group(0))


def select(pins: list[str], names: list[str]) -> list[str]:
    """The pins of ``names`` (ValueError naming those the set does not pin)."""
    by_name = {pin_name(line): line for line in pins}
    missing = sorted({canonical(n) for n in names} - set(by_name))
    if missing:
        raise ValueError(f"the lock file pins no version of {missing}")
    return [by_name[canonical(n)] for n in names]


def drop(pins: list[str], names: tuple[str, ...]) -> list[str]:
    """``pins`` without the projects in ``names``."""
    excluded = {canonical(n) for n in names}
    return [line for line in pins if pin_name(line) not in excluded]


def link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link ``src`` to ``dest`` (same file system), else copy it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        dest.unlink()
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
