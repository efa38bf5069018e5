"""The experiment pages over real experiments, served by uvicorn (Airflow's auth: tests/airflow/test_plugin.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
import requests
from fastapi import FastAPI

from jipfed.central.serve import serve_in_thread
from jipfed.central.ui import ui_router
from jipfed.central.ui_html import Links
from jipfed.storage.base import ModelStore
from jipfed.storage.state import ExperimentStore

from .experiments import FAILURE, ROUND_S


@pytest.fixture(scope="module")
def pages(ui_store: ModelStore) -> Iterator[str]:
    links = Links(
        base="/ui", dag_run=lambda exp, step: f"/dags/jipfed_central/runs/jipfed__{exp}__step{step:04d}"
    )
    app = FastAPI()
    app.include_router(
        ui_router(lambda: ui_store, links=links, experiment_of_run=lambda dag, run: run.split("__")[1]),
        prefix="/ui",
    )
    url, stop = serve_in_thread(app)
    yield f"{url}/ui"
    stop()


def get(url: str, status: int = 200) -> str:
    answer = requests.get(url, timeout=30, allow_redirects=False)
    assert answer.status_code == status, answer.text[:500]
    return answer.text


def charts_of(text: str) -> list[dict]:
    [data] = re.findall(r"<script type='application/json' id='jipfed-charts'>(.*?)</script>", text, re.S)
    return json.loads(data)


def aggregate(store: ModelStore, exp: str, round_: int) -> dict:
    return ExperimentStore(store, exp).load_aggregate(round_)


def test_list_shows_every_experiment_and_a_compare_form(pages: str) -> None:
    text = get(f"{pages}/experiments")
    assert "<a href='/ui/experiments/running'>running</a>" in text
    assert "2 of 3 rounds closed (step 2 of 3)" in text and "2 of 2 rounds closed (step 2 of 2)" in text
    assert "<form method='get' action='/ui/compare'>" in text and "value='fedprox'" in text
    assert "broken" in text and "unreadable" in text


def test_running_experiment_shows_progress_timing_and_participation(pages: str, ui_store: ModelStore) -> None:
    text = get(f"{pages}/experiments/running")
    assert "<b id='progress'>2 of 3 rounds closed</b>" in text
    assert "time per round 3600.0 s" in text and "<meta http-equiv='refresh' content='30'>" in text
    started = datetime.fromisoformat(re.search(r"Started ([0-9T:+-]+);", text)[1])
    finish = datetime.fromisoformat(re.search(r"expected finish ([0-9T:+-]+)", text)[1])
    assert finish - started == timedelta(seconds=3 * ROUND_S)  # 2 rounds dispatched after the start, 1 to go
    reason = "fetch_dicom failed: &lt;PACS&gt; unreachable"
    assert f"<td class='grid missing' title='missing: {reason}' data-site='site-c' data-round='1'>" in text
    assert "data-site='site-c' data-round='2'>&hellip;</td>" in text  # the open round
    assert (
        "<td class='grid included' title='included: update aggregated' data-site='site-a' data-round='0'>"
        in text
    )
    assert FAILURE not in text  # escaped everywhere
    assert "<a target='_top' href='/dags/jipfed_central/runs/jipfed__running__step0001'>step 1</a>" in text
    assert "Open step 2 (round 2)" in text


def test_round_table_and_charts_show_the_stored_numbers(pages: str, ui_store: ModelStore) -> None:
    text = get(f"{pages}/experiments/running")
    records = [aggregate(ui_store, "running", r) for r in (0, 1)]
    cells = re.findall(r"<td class='num metric'>([0-9.]+)</td>", text)
    assert cells == [f"{r['metrics']['val_dice_mean']:.4f}" for r in records]
    dice, loss = charts_of(text)
    assert dice["x"] == [0, 1] and loss["title"] == "Loss per round"
    lines = {line["label"]: line["values"] for line in dice["lines"]}
    assert lines["all sites: held-out Dice after local training"] == [
        r["metrics"]["val_dice_mean"] for r in records
    ]
    site_c = lines["site-c: held-out Dice after local training"]
    assert site_c == [records[0]["sites"]["site-c"]["val_dice_mean"], None]  # no update in round 1
    assert "<script defer src='/ui/static/uplot/uPlot.iife.min.js'></script>" in text


def test_failure_report_and_static_files(pages: str) -> None:
    text = get(f"{pages}/experiments/running/rounds/1/failures/site-c")
    assert "fetch_dicom failed: &lt;PACS&gt; unreachable" in text
    get(f"{pages}/experiments/running/rounds/0/failures/site-c", 404)
    get(f"{pages}/experiments/running/rounds/1/failures/..", 404)
    script = requests.get(f"{pages}/static/uplot/uPlot.iife.min.js", timeout=30)
    assert script.headers["content-type"].startswith("text/javascript") and b"uPlot" in script.content[:200]
    assert "MIT License" in get(f"{pages}/static/uplot/LICENSE")
    get(f"{pages}/static/../ui.py", 404)


def test_finished_experiment_shows_the_final_model_its_scores_and_its_report(
    pages: str, ui_store: ModelStore
) -> None:
    text = get(f"{pages}/experiments/fedavg")
    card = ui_store.get_json("experiments/fedavg/final/model_card.json")
    assert f"<code id='model-sha256'>{card['model']['sha256']}</code>" in text
    assert "http-equiv='refresh'" not in text  # finished: no reloading
    summary = ui_store.get_json("experiments/fedavg/evaluation/final/summary.json")
    assert "Final model (final) scored on every site" in text
    for site, answer in summary["sites"].items():
        dice = answer["metrics"]["final"]["dice_mean"]
        assert f"<td>{site}</td><td class='num'>{answer['n_cases']}</td>" in text and f"{dice:.4f}" in text
    assert f"<td class='num'>{summary['weighted']['final']['dice_mean']:.4f}</td>" in text
    assert "href='/ui/experiments/fedavg/final/report.html'" in text
    stored = get(f"{pages}/experiments/fedavg/final/report.html")
    assert stored == ui_store.get_bytes("experiments/fedavg/final/report.html").decode()
    for report in (stored, get(f"{pages}/experiments/fedavg/report.html")):
        assert " src=" not in report and " href=" not in report and "var uPlot=" in report  # opens offline
        assert card["model"]["sha256"] in report and "train.lr" in report and "scored on every site" in report
        assert len(charts_of(report)) == 2


def test_an_unscored_final_model_says_so(pages: str) -> None:
    text = get(f"{pages}/experiments/fedprox")
    assert "<b>not scored</b>" in text and "final/report.html" not in text
    get(f"{pages}/experiments/fedprox/final/report.html", 404)


def test_compare_overlays_curves_and_settings(pages: str, ui_store: ModelStore) -> None:
    get(f"{pages}/compare?e=fedavg", 400)
    get(f"{pages}/compare?e=fedavg&e=nope", 404)
    text = get(f"{pages}/compare?e=fedavg&e=fedprox&e=running")
    per_round, per_epoch = charts_of(text)
    assert per_round["x"] == [0, 1]
    fedprox = [aggregate(ui_store, "fedprox", r)["metrics"]["val_dice_mean"] for r in (0, 1)]
    assert per_round["lines"][1] == {
        "label": "fedprox: val_dice_mean",
        "values": fedprox,
        "width": 2,
        "color": per_round["lines"][1]["color"],
    }
    epochs = aggregate(ui_store, "fedavg", 0)["metrics"]["epochs"]
    assert per_epoch["x"] == [epochs, 2 * epochs]
    assert "<td class='differs'>strategy</td><td>&quot;fedavg&quot;</td><td>&quot;fedprox&quot;</td>" in text
    assert "<td class=''>train.lr</td>" in text


def test_dag_run_tab_redirects_and_bad_names_are_refused(pages: str) -> None:
    answer = requests.get(
        f"{pages}/runs/jipfed_central/jipfed__fedavg__step0001", timeout=30, allow_redirects=False
    )
    assert (answer.status_code, answer.headers["location"]) == (307, "/ui/experiments/fedavg")
    get(f"{pages}/experiments/nope", 404)
    get(f"{pages}/experiments/a.b", 400)
