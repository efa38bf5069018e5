"""Where a line lives in the central store: definition, runs, versions, released pointer, watermarks.

::

    lines/<line>/line.json                         the definition (LineConfig, overwritten by `set`)
    lines/<line>/runs/<slot>.json                  one scheduled run: stage, census counts, experiment,
                                                   verdict, version (the history is the list of runs)
    lines/<line>/versions/v<NNNN>/record.json      every candidate: date, parent, counts and metrics
                                                   per site, verdict, status released | rejected
    lines/<line>/versions/v<NNNN>/model.safetensors (+ model.json manifest)
    lines/<line>/versions/v<NNNN>/card.md          the model card (released versions)
    lines/<line>/released.json                     the released version (what sites may fetch)
    lines/<line>/watermarks.json                   per site: as_of of the last training that used it

Only numbers about the sites' data are stored (counts, scores), never a case key.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from jipfed.lines.definition import LineConfig
from jipfed.storage.base import ModelStore, ObjectNotFoundError, canonical_json
from jipfed.storage.layout import validate_slug

LINES_PREFIX = "lines/"


def slot_id(slot: datetime) -> str:
    """``20261206T020000Z``: a slot time as a key part."""
    return slot.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def version_name(number: int) -> str:
    return f"v{number:04d}"


class LineStore:
    """One line's objects in ``store``."""

    def __init__(self, store: ModelStore, line: str) -> None:
        self.store = store
        self.line = validate_slug(line, "line name")
        self.prefix = f"{LINES_PREFIX}{self.line}"

    # -- definition --------------------------------------------------------------------------------

    @property
    def definition_key(self) -> str:
        return f"{self.prefix}/line.json"

    def exists(self) -> bool:
        return self.store.exists(self.definition_key)

    def load(self) -> LineConfig:
        try:
            data = self.store.get_json(self.definition_key)
        except ObjectNotFoundError:
            raise KeyError(f"no line {self.line!r} in the store") from None
        try:
            return LineConfig.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{self.definition_key}: {exc}") from None

    def save(self, line: LineConfig, *, create: bool) -> None:
        """Store the definition; ``create`` refuses an existing line, otherwise it must exist."""
        if line.name != self.line:
            raise ValueError(f"definition is for line {line.name!r}, not {self.line!r}")
        if create and self.exists():
            raise ValueError(f"line {self.line!r} exists already; change it with `set`")
        if not create and not self.exists():
            raise KeyError(f"no line {self.line!r} in the store; create it first")
        self.store.put_json(self.definition_key, line.to_dict(), overwrite=True)

    # -- runs --------------------------------------------------------------------------------------

    def run_key(self, slot: str) -> str:
        return f"{self.prefix}/runs/{slot}.json"

    def load_run(self, slot: str) -> dict[str, Any] | None:
        key = self.run_key(slot)
        return self.store.get_json(key) if self.store.exists(key) else None

    def save_run(self, slot: str, record: Mapping[str, Any]) -> None:
        self.store.put_json(self.run_key(slot), dict(record), overwrite=True)

    def runs(self) -> list[dict[str, Any]]:
        """Every run record, oldest slot first."""
        prefix = f"{self.prefix}/runs/"
        keys = sorted(
            k for k in self.store.list(prefix) if k.endswith(".json") and "/" not in k[len(prefix) :]
        )
        return [self.store.get_json(k) for k in keys]

    # -- versions ----------------------------------------------------------------------------------

    def version_prefix(self, version: str) -> str:
        return f"{self.prefix}/versions/{validate_slug(version, 'version')}"

    def versions(self) -> list[dict[str, Any]]:
        """Every version record (released and rejected), in order."""
        keys = sorted(k for k in self.store.list(f"{self.prefix}/versions/") if k.endswith("/record.json"))
        return [self.store.get_json(k) for k in keys]

    def next_version(self) -> str:
        return version_name(len(self.versions()) + 1)

    def save_version(
        self, record: Mapping[str, Any], payload: bytes, manifest: Mapping[str, Any], card: str | None
    ) -> None:
        """Write a version once (a re-run after a crash writes the same bytes or fails loudly)."""
        prefix = self.version_prefix(record["version"])
        self.store.put_if_absent_or_same(f"{prefix}/model.safetensors", payload)
        self.store.put_if_absent_or_same(f"{prefix}/model.json", canonical_json(dict(manifest)))
        if card is not None:
            self.store.put_if_absent_or_same(f"{prefix}/card.md", card.encode("utf-8"))
        self.store.put_if_absent_or_same(f"{prefix}/record.json", canonical_json(dict(record)))

    def load_version(self, version: str) -> dict[str, Any]:
        return self.store.get_json(f"{self.version_prefix(version)}/record.json")

    def card(self, version: str) -> str:
        return self.store.get_bytes(f"{self.version_prefix(version)}/card.md").decode("utf-8")

    # -- released ----------------------------------------------------------------------------------

    @property
    def released_key(self) -> str:
        return f"{self.prefix}/released.json"

    def released(self) -> dict[str, Any] | None:
        """The released version's pointer ``{"version", "sha256", "released_at"}``, or None."""
        return self.store.get_json(self.released_key) if self.store.exists(self.released_key) else None

    def release(self, version: str, sha256: str, released_at: str) -> None:
        self.store.put_json(
            self.released_key,
            {"version": version, "sha256": sha256, "released_at": released_at},
            overwrite=True,
        )

    def released_model(self) -> tuple[str, bytes, dict[str, Any]]:
        """(version, payload, manifest) of the released model; KeyError when none is released.

        Rejected candidates are never returned: only the version the pointer names, whose record
        says released and whose bytes match the pointer's sha256.
        """
        from jipfed.storage.state import sha256_hex

        pointer = self.released()
        if pointer is None:
            raise KeyError(f"line {self.line!r} has no released model yet")
        version = pointer["version"]
        if self.load_version(version).get("status") != "released":
            raise ValueError(f"line {self.line!r}: {version} is not a released version")
        prefix = self.version_prefix(version)
        payload = self.store.get_bytes(f"{prefix}/model.safetensors")
        if sha256_hex(payload) != pointer["sha256"]:
            raise ValueError(f"line {self.line!r}: {version}'s model does not match the released sha256")
        return version, payload, self.store.get_json(f"{prefix}/model.json")

    # -- watermarks --------------------------------------------------------------------------------

    @property
    def watermarks_key(self) -> str:
        return f"{self.prefix}/watermarks.json"

    def watermarks(self) -> dict[str, str]:
        return self.store.get_json(self.watermarks_key) if self.store.exists(self.watermarks_key) else {}

    def advance_watermarks(self, sites: list[str], as_of: str) -> None:
        """Move the sites' watermarks to ``as_of`` (never back: a repeated older run changes nothing)."""
        marks = self.watermarks()
        later = datetime.fromisoformat(as_of)
        marks.update({s: as_of for s in sites if s not in marks or datetime.fromisoformat(marks[s]) < later})
        self.store.put_json(self.watermarks_key, marks, overwrite=True)


def list_lines(store: ModelStore) -> list[str]:
    """Names of the lines in ``store``."""
    names = []
    for key in store.list(LINES_PREFIX):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "line.json":
            names.append(parts[1])
    return sorted(names)
