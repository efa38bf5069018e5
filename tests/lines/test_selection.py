"""The site's ledger: new cases since a watermark, replay sample, and census requests."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from jipfed.federation import site_requests
from jipfed.lines.selection import census, replay_sample, select_training
from jipfed.storage.local import LocalFolderStore

N1, N2 = "2026-12-05T02:00:00+00:00", "2026-12-06T02:00:00+00:00"


class Rec:
    def __init__(self, key: str) -> None:
        self.case_key = key


def test_new_cases_and_replay(tmp_path: Path) -> None:
    assert census(tmp_path, "l", ["a", "b", "c"], as_of=N1, since=None) == {"new_cases": 3, "total_cases": 3}
    assert census(tmp_path, "l", ["a", "b", "c", "d"], as_of=N2, since=N1) == {
        "new_cases": 1,
        "total_cases": 4,
    }
    records = [Rec(k) for k in "abcde"]  # "e" arrived after the census: waits for the next run
    chosen, counts = select_training(
        tmp_path, records, {"line": "l", "since": N1, "until": N2, "replay": 2, "seed": 1}
    )
    assert counts == {"new_cases": 1, "replay_cases": 2}
    assert {r.case_key for r in chosen} - {"a", "b", "c"} == {"d"}
    assert replay_sample(["a", "b", "c"], 2, 1) == replay_sample(["c", "b", "a"], 2, 1)


def test_requests_take_numbers_only_once_and_before_the_deadline(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path)
    now = datetime(2026, 12, 6, tzinfo=timezone.utc)
    request = site_requests.open_request(
        store,
        kind="census",
        request_id="l.x",
        prefix="lines/l/runs/x/census",
        sites=["s1", "s2"],
        timeout_s=60,
        body={},
        now=now,
    )
    assert [r.id for r in site_requests.pending_requests(store, "s1", "census", now)] == ["l.x"]
    with pytest.raises(ValueError, match="only finite numbers"):
        site_requests.answer(store, request, "s1", {"case": "SYN-site-a-001"}, now)
    site_requests.answer(store, request, "s1", {"new_cases": 2}, now)
    with pytest.raises(PermissionError, match="already answered"):
        site_requests.answer(store, request, "s1", {"new_cases": 3}, now)
    with pytest.raises(PermissionError, match="not asked"):
        site_requests.answer(store, request, "s3", {"new_cases": 3}, now)
    assert site_requests.collect(store, request, now) == ({"s1": {"new_cases": 2}}, {}, ["s2"])
    later = now + timedelta(seconds=61)
    answers, failures, waiting = site_requests.collect(store, request, later)
    assert waiting == [] and "no answer before the deadline" in failures["s2"]
