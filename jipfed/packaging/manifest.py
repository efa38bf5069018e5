"""A sha256 manifest of every file under a folder (``sha256sum -c`` format) and its verification."""

from __future__ import annotations

import hashlib
from pathlib import Path

MANIFEST_NAME = "SHA256SUMS"


def sha256_file(path: Path) -> str:
    """Hex sha256 of one file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and path.relative_to(root).as_posix() != MANIFEST_NAME
    )


def write_manifest(root: Path) -> Path:
    """Write ``root/SHA256SUMS`` listing every other file under ``root``; returns its path."""
    lines = [f"{sha256_file(root / name)}  {name}\n" for name in _files(root)]
    manifest = root / MANIFEST_NAME
    manifest.write_text("".join(lines))
    return manifest


def verify_manifest(root: Path) -> list[str]:
    """Problems found (empty when every file matches): changed, missing and unlisted files."""
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        return [f"{manifest}: no checksum manifest"]
    problems: list[str] = []
    listed: set[str] = set()
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            problems.append(f"{manifest}:{number}: not a '<sha256>  <path>' line")
            continue
        listed.add(name)
        path = root / name
        if not path.is_file():
            problems.append(f"{name}: listed in {MANIFEST_NAME} but missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: sha256 differs from {MANIFEST_NAME} (changed or corrupt)")
    problems += [f"{name}: not listed in {MANIFEST_NAME}" for name in _files(root) if name not in listed]
    return problems
