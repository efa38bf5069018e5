"""A line's runs over the real round protocol core, with in-process sites on synthetic cases.

Nights: 1 trains from scratch (released, first version); 2 trains only on the new cases of one
site plus the replay sample and is compared with v1; 3 uses a far too high learning rate and is
rejected (the released model stays); 4 has no new data and is skipped with its reason.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from jipfed.lines.nightly import REJECTED, RELEASED, RUNNING, SKIPPED, advance, due_runs
from jipfed.lines.site import LineSite
from jipfed.lines.store import LineStore
from jipfed.storage.base import ModelStore
from jipfed.training.data import SiteData
from tests.lines.conftest import tiny_line
from tests.training.synth import write_site

SITES = ("site-a", "site-b")


def night(day: int) -> datetime:
    return datetime(2026, 12, day, 2, 0, tzinfo=timezone.utc)


def sites_with(root: Path, counts: dict[str, int]) -> list[LineSite]:
    return [
        LineSite(
            site,
            root / site / "data",
            SiteData.from_dir(
                write_site(root / site / "cases", counts[site], seed=i, prefix=str(i)), group=site
            ),
        )
        for i, site in enumerate(SITES)
    ]


def run_night(store: ModelStore, sites: list[LineSite], day: int) -> dict:
    (due,) = due_runs(store, night(day))
    assert due == {"line": "glioma", "slot": night(day).isoformat(timespec="seconds")}
    for _ in range(20):
        record = advance(store, due["line"], due["slot"])
        if record["status"] != RUNNING:
            return record
        assert sum(site.answer(store) for site in sites) > 0, f"the run waits but no site had work: {record}"
    raise AssertionError(f"the run did not finish: {record}")


def test_two_nights_a_worse_candidate_and_an_empty_night(store: ModelStore, tmp_path: Path) -> None:
    lines = LineStore(store, "glioma")
    lines.save(tiny_line(), create=True)

    first = run_night(store, sites_with(tmp_path, {"site-a": 4, "site-b": 4}), 5)
    assert first["status"] == RELEASED, first
    assert first["verdict"]["reasons"] == ["first version of the line"]
    assert {s: c["new_cases"] for s, c in first["census"]["sites"].items()} == {"site-a": 4, "site-b": 4}
    assert lines.released()["version"] == "v0001"
    assert due_runs(store, night(5)) == []  # ran once for its slot

    sites = sites_with(tmp_path, {"site-a": 6, "site-b": 4})  # two new cases in site-a's PACS
    second = run_night(store, sites, 6)
    census = second["census"]["sites"]
    assert {s: c["new_cases"] for s, c in census.items()} == {"site-a": 2, "site-b": 0}
    for site in SITES:  # trained on new training cases plus the replay sample, nothing else
        assert (
            second["trained"]["n_samples"].get(site, 0)
            == census[site]["train_new"] + census[site]["train_replay"]
        )
        assert census[site]["train_replay"] == 1
    assert census["site-a"]["train_new"] >= 1
    assert second["parent"] == "v0001"
    assert set(second["evaluation"]["weighted"]) == {"candidate", "released"}
    assert second["status"] in (RELEASED, REJECTED) and second["verdict"]["checks"]["sites"]
    versions = lines.versions()
    assert [v["version"] for v in versions] == ["v0001", "v0002"]
    released_before = lines.released()

    lines.save(
        lines.load().updated(
            {
                "experiment": {
                    "train": {"size": "tiny", "steps": 3, "batch_size": 2, "lr": 1e3, "val_fraction": 0.25}
                }
            }
        ),
        create=False,
    )
    sites = sites_with(tmp_path, {"site-a": 6, "site-b": 6})
    third = run_night(store, sites, 7)
    assert third["status"] == REJECTED, third["verdict"]
    assert lines.released() == released_before
    assert lines.load_version(third["version"])["status"] == "rejected"
    assert not store.exists(f"lines/glioma/versions/{third['version']}/card.md")

    fourth = run_night(store, sites, 8)
    assert fourth["status"] == SKIPPED
    assert "no new cases" in fourth["reason"]
    assert len(lines.versions()) == 3 and lines.released() == released_before
