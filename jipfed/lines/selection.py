"""The site's side of a line: which cases are new since the line's watermark, and the replay sample.

A site keeps, per line, a ledger of the cases it has seen and when first
(``<data_root>/lines/<line>/seen.json``: case key → the run time ``as_of`` of the census that first
saw it). It never leaves the site. The central's watermark for the site is the ``as_of`` of the
line's last training that used the site: cases first seen after it are *new*; older cases are the
replay pool. Only counts go to the central.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from jipfed.storage.layout import validate_slug

T = TypeVar("T")


def ledger_path(data_root: Path | str, line: str) -> Path:
    return Path(data_root) / "lines" / validate_slug(line, "line name") / "seen.json"


def _time(text: str, what: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise ValueError(f"{what} is not an ISO time: {text!r}") from None
    if moment.tzinfo is None:
        raise ValueError(f"{what} must carry a time zone: {text!r}")
    return moment


def load_ledger(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise ValueError(f"{path}: a line ledger must map case keys to ISO times")
    return data


def observe(path: Path, case_keys: Iterable[str], as_of: str) -> dict[str, str]:
    """Add the case keys not seen before with first-seen time ``as_of``; return the ledger."""
    _time(as_of, "as_of")
    ledger = load_ledger(path)
    added = {key: as_of for key in case_keys if key not in ledger}
    if added:
        ledger.update(added)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ledger, sort_keys=True))
        os.replace(tmp, path)
    return ledger


def is_new(first_seen: str, since: str | None, until: str) -> bool:
    """Seen after the watermark ``since`` (None: never trained) and not after ``until``."""
    seen = _time(first_seen, "first seen")
    return seen <= _time(until, "until") and (since is None or seen > _time(since, "since"))


def count_new(ledger: Mapping[str, str], keys: Iterable[str], since: str | None, until: str) -> int:
    return sum(1 for key in keys if key in ledger and is_new(ledger[key], since, until))


def census(
    data_root: Path | str, line: str, case_keys: Sequence[str], *, as_of: str, since: str | None
) -> dict[str, int]:
    """Record the site's current cases in the line's ledger; ``{"new_cases", "total_cases"}``."""
    ledger = observe(ledger_path(data_root, line), case_keys, as_of)
    return {"new_cases": count_new(ledger, case_keys, since, as_of), "total_cases": len(case_keys)}


def replay_sample(keys: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` of ``keys`` drawn deterministically (ranked by sha256 of seed and key)."""
    ranked = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    return sorted(ranked[: max(0, n)])


def select_training(
    data_root: Path | str, records: Sequence[T], selection: Mapping[str, Any], key: str = "case_key"
) -> tuple[list[T], dict[str, int]]:
    """The records a line's run trains on: the new ones plus the replay sample; with counts.

    ``selection``: ``{"line", "since" (None = first run), "until", "replay", "seed"}`` from the
    experiment's ``case_selection``. Records the ledger has not seen yet (arrived after the
    census) wait for the next run.
    """
    line = str(selection["line"])
    ledger = load_ledger(ledger_path(data_root, line))
    since, until = selection.get("since"), str(selection["until"])
    new, old = [], []
    for record in records:
        first = ledger.get(getattr(record, key))
        if first is None:
            continue
        if is_new(first, since, until):
            new.append(record)
        elif since is not None and _time(first, "first seen") <= _time(since, "since"):
            old.append(record)
    chosen = set(
        replay_sample(
            [getattr(r, key) for r in old], int(selection.get("replay", 0)), int(selection.get("seed", 0))
        )
    )
    replay = [r for r in old if getattr(r, key) in chosen]
    return new + replay, {"new_cases": len(new), "replay_cases": len(replay)}
