"""A line's runs over the real round protocol core, with in-process sites on synthetic cases.

Nights: 1 trains from scratch (released, first version); 2 trains only on the new cases of one
site plus the replay sample and is compared with v1; 3 uses a far too high learning rate and is
rejected (the released model stays); 4 has no new data and is skipped with its reason. The other
tests read the store those nights leave: the page, the CLI and the central's routes.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors

from jipfed.central.app import create_app
from jipfed.central.client import CentralClient, CentralError, CentralRefused
from jipfed.central.serve import serve_in_thread
from jipfed.central.tokens import site_token
from jipfed.cli import main as jipfed_main
from jipfed.federation import site_requests
from jipfed.federation.evaluation import request_evaluation, summarise
from jipfed.lines.census import census_result, request_census
from jipfed.lines.nightly import REJECTED, RELEASED, RUNNING, SKIPPED, advance, due_runs
from jipfed.lines.page import render_line_page, render_lines_page
from jipfed.lines.site import LineSite, answer_over_http
from jipfed.lines.store import LineStore
from jipfed.storage.base import ModelStore
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore
from jipfed.training.data import SiteData
from tests.lines.conftest import tiny_line
from tests.training.synth import write_site

SITES = ("site-a", "site-b")
SECRET = "s" * 64


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


def run_night(store: ModelStore, sites: list[LineSite], day: int, line: str = "glioma") -> dict:
    (due,) = [d for d in due_runs(store, night(day)) if d["line"] == line]
    assert due == {"line": line, "slot": night(day).isoformat(timespec="seconds")}
    for _ in range(20):
        record = advance(store, due["line"], due["slot"])
        if record["status"] != RUNNING:
            return record
        assert sum(site.answer(store) for site in sites) > 0, f"the run waits but no site had work: {record}"
    raise AssertionError(f"the run did not finish: {record}")


@pytest.fixture(scope="module")
def nights(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalFolderStore, list[dict]]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("nights")
    store = LocalFolderStore(root / "central")
    lines = LineStore(store, "glioma")
    lines.save(tiny_line(), create=True)
    runs = [run_night(store, sites_with(root, {"site-a": 4, "site-b": 4}), 5)]
    assert due_runs(store, night(5)) == []  # ran once for its slot
    runs.append(run_night(store, sites_with(root, {"site-a": 6, "site-b": 4}), 6))  # 2 new at site-a
    bad_train = {"size": "tiny", "steps": 3, "batch_size": 2, "lr": 1e3, "val_fraction": 0.25}
    lines.save(lines.load().updated({"experiment": {"train": bad_train}}), create=False)
    runs.append(run_night(store, sites_with(root, {"site-a": 6, "site-b": 6}), 7))
    runs.append(run_night(store, sites_with(root, {"site-a": 6, "site-b": 6}), 8))
    return store, runs


def test_first_night_releases_the_first_version(nights: tuple[LocalFolderStore, list[dict]]) -> None:
    store, (first, *_) = nights
    assert first["status"] == RELEASED, first
    assert first["verdict"]["reasons"] == ["first version of the line"]
    assert {s: c["new_cases"] for s, c in first["census"]["sites"].items()} == {"site-a": 4, "site-b": 4}
    assert LineStore(store, "glioma").load_version("v0001")["status"] == "released"


def test_second_night_trains_on_new_cases_plus_replay_only(
    nights: tuple[LocalFolderStore, list[dict]],
) -> None:
    store, (_, second, *_) = nights
    census = second["census"]["sites"]
    assert {s: c["new_cases"] for s, c in census.items()} == {"site-a": 2, "site-b": 0}
    for site in SITES:
        assert census[site]["train_replay"] == 1
        assert second["trained"]["n_samples"].get(site, 0) == census[site]["train_new"] + 1
    assert second["parent"] == "v0001" and set(second["evaluation"]["weighted"]) == {"candidate", "released"}
    assert second["status"] in (RELEASED, REJECTED) and set(second["verdict"]["checks"]["sites"]) == set(
        SITES
    )


def test_a_worse_candidate_is_rejected_and_an_empty_night_skipped(
    nights: tuple[LocalFolderStore, list[dict]],
) -> None:
    store, (_, second, third, fourth) = nights
    lines = LineStore(store, "glioma")
    assert third["status"] == REJECTED, third["verdict"]
    assert lines.released()["version"] == (second["version"] if second["status"] == RELEASED else "v0001")
    assert not store.exists(f"lines/glioma/versions/{third['version']}/card.md")
    assert fourth["status"] == SKIPPED and "no new cases" in fourth["reason"]
    assert [v["status"] for v in lines.versions()][2] == "rejected" and len(lines.versions()) == 3


def test_page_shows_versions_and_per_site_scores(nights: tuple[LocalFolderStore, list[dict]]) -> None:
    store, runs = nights
    lines = LineStore(store, "glioma")
    page = render_line_page(store, "glioma")
    released = lines.released()["version"]
    assert f"<b id='released'>{released}</b>" in page
    for version in lines.versions():
        row = re.search(rf"<tr class='{version['status']}'><td>{version['version']}</td>.*?</tr>", page)
        assert row, version["version"]
        for site in SITES:
            score = version["evaluation"]["sites"][site]["metrics"]["candidate"]["dice_mean"]
            assert f"{score:.4f}" in page
    assert "no new cases" in page and page.count("<polyline") == len(SITES)
    assert f"<td>glioma</td><td>{released}</td><td>3</td>" in render_lines_page(store)
    card = lines.card("v0001")
    assert "# glioma v0001" in card and "first version" in card


def test_cli_lists_lines_and_versions_and_fetches_only_the_released(
    nights: tuple[LocalFolderStore, list[dict]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, _ = nights
    lines = LineStore(store, "glioma")
    assert jipfed_main(["lines", "list", "--store", str(store.root)]) == 0
    assert (
        f"glioma\tsites=site-a,site-b\tschedule='0 2 * * *'\treleased={lines.released()['version']}"
        in capsys.readouterr().out
    )
    assert jipfed_main(["lines", "versions", "glioma", "--store", str(store.root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [row.split("\t")[1] for row in out[1:]] == [v["status"] for v in lines.versions()]
    assert (
        jipfed_main(
            [
                "lines",
                "fetch-released",
                "glioma",
                "--store",
                str(store.root),
                "--out",
                str(tmp_path / "m.safetensors"),
            ]
        )
        == 0
    )
    assert hashlib.sha256((tmp_path / "m.safetensors").read_bytes()).hexdigest() == lines.released()["sha256"]
    assert jipfed_main(["lines", "set", "glioma", "--store", str(store.root), "--set", "paused=true"]) == 0
    assert lines.load().paused and due_runs(store, night(9)) == []
    lines.save(lines.load().updated({"paused": False}), create=False)


def test_central_serves_the_released_model_and_requests(nights: tuple[LocalFolderStore, list[dict]]) -> None:
    store, _ = nights
    lines = LineStore(store, "glioma")
    url, stop = serve_in_thread(create_app(lambda: store, SECRET))
    try:
        client = CentralClient(url, site_token(SECRET, "site-a"), timeout_s=30, backoff_s=0.01)
        version, payload = client.get_released_model("glioma")
        assert version == lines.released()["version"]
        assert hashlib.sha256(payload).hexdigest() == lines.released()["sha256"]
        stranger = CentralClient(url, site_token(SECRET, "site-z"), timeout_s=30, backoff_s=0.01)
        with pytest.raises(CentralError, match="not one of its sites"):
            stranger.get_released_model("glioma")
        request = site_requests.open_request(
            store,
            kind="census",
            request_id="glioma.probe",
            prefix="lines/glioma/runs/probe/census",
            sites=list(SITES),
            timeout_s=60,
            body={"line": "glioma"},
        )
        assert [r["id"] for r in client.pending_requests()["census"]] == ["glioma.probe"]
        with pytest.raises(CentralError, match="only finite numbers"):
            client.answer_request("census", "glioma.probe", {"who": "SYN-site-a-001"})
        client.answer_request("census", "glioma.probe", {"new_cases": 1})
        with pytest.raises(CentralRefused, match="already answered"):
            client.answer_request("census", "glioma.probe", {"new_cases": 2})
        assert site_requests.collect(store, request)[0] == {"site-a": {"new_cases": 1}}
        site_requests.close_request(store, request)
    finally:
        stop()


def test_missed_nights_run_once_and_a_finished_run_is_left_alone(
    nights: tuple[LocalFolderStore, list[dict]],
) -> None:
    store, (first, *_) = nights
    at = datetime(2026, 12, 12, 3, 30, tzinfo=timezone.utc)  # Airflow was down for three nights
    assert due_runs(store, at) == [{"line": "glioma", "slot": night(12).isoformat()}]
    versions = LineStore(store, "glioma").versions()
    assert advance(store, "glioma", first["slot"]) == first
    assert LineStore(store, "glioma").versions() == versions


def test_a_crash_during_the_decision_repeats_it_without_a_second_release(
    nights: tuple[LocalFolderStore, list[dict]],
) -> None:
    store, (first, *_) = nights
    lines = LineStore(store, "glioma")
    before = (lines.versions(), lines.released(), lines.watermarks())
    lines.save_run(first["slot_id"], {**first, "status": RUNNING, "stage": "decision"})  # died before its end
    assert due_runs(store, night(12)) == [{"line": "glioma", "slot": first["slot"]}]  # resumed first
    again = advance(store, "glioma", first["slot"])
    assert again["status"] == RELEASED and again["version"] == first["version"]
    assert (lines.versions(), lines.watermarks()) == (before[0], before[2])
    assert lines.released() == before[1]  # the later release stays
    lines.save_run(first["slot_id"], first)


def test_a_site_answers_census_and_evaluation_over_http(
    nights: tuple[LocalFolderStore, list[dict]], tmp_path: Path
) -> None:
    store, (first, *_) = nights
    exp_store = ExperimentStore(store, first["experiment"])
    final = load_tensors(store.get_bytes(exp_store.layout.final("model.safetensors")))
    census = request_census(
        store,
        line="glioma",
        slot="http",
        sites=["site-a"],
        since={},
        as_of=night(20).isoformat(),
        replay=1,
        seed=0,
        val_fraction=0.25,
        timeout_s=120,
    )
    scoring = request_evaluation(
        exp_store, "http-check", {"candidate": final}, sites=["site-a"], timeout_s=120
    )
    data = SiteData.from_dir(write_site(tmp_path / "cases", 4, seed=0, prefix="0"), group="site-a")
    url, stop = serve_in_thread(create_app(lambda: store, SECRET))
    try:
        client = CentralClient(url, site_token(SECRET, "site-a"), timeout_s=30, backoff_s=0.01)
        assert answer_over_http(client, "site-a", tmp_path / "data", data) == {"census": 1, "evaluate": 1}
        assert client.pending_requests() == {"census": [], "evaluate": []}
    finally:
        stop()
    assert census_result(store, census)["sites"]["site-a"]["new_cases"] == 4
    summary = summarise(store, scoring)
    assert summary["sites"]["site-a"]["n_cases"] == 1
    assert (
        summary["weighted"]["candidate"]["dice_mean"]
        == summary["sites"]["site-a"]["metrics"]["candidate"]["dice_mean"]
    )


def test_two_lines_run_independently(nights: tuple[LocalFolderStore, list[dict]], tmp_path: Path) -> None:
    """Last in this module: it adds a line to the shared store (paused at the end)."""
    store, _ = nights
    glioma = LineStore(store, "glioma")
    before = (glioma.versions(), glioma.released(), glioma.watermarks(), glioma.runs())
    solo = LineStore(store, "solo")
    solo.save(tiny_line("solo", sites=("site-a",)), create=True)
    record = run_night(store, sites_with(tmp_path, {"site-a": 4, "site-b": 4}), 21, line="solo")
    assert record["status"] == RELEASED and record["version"] == "v0001" and record["parent"] is None
    assert record["census"]["sites"] == {
        "site-a": {"new_cases": 4, "total_cases": 4, "train_new": 3, "train_replay": 0}
    }
    assert (glioma.versions(), glioma.released(), glioma.watermarks(), glioma.runs()) == before
    solo.save(solo.load().updated({"paused": True}), create=False)
