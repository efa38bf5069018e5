"""The experiment pages (without Airflow's auth here; tests/airflow/test_plugin.py adds it)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import requests
from fastapi import FastAPI

from jipfed.central.serve import serve_in_thread
from jipfed.central.ui import ui_router
from jipfed.federation.codec import EncodedUpdate
from jipfed.federation.dispatch import (
    accept_in_time,
    dispatch_step,
    model_for_site,
    pending_work,
    report_site_failure,
)
from jipfed.federation.rounds import aggregate_step
from jipfed.federation.site_round import run_site_step
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore
from jipfed.training.local import LocalTrainer

from .helpers import start

REASON = "fetch_dicom failed: <PACS> unreachable"


def local_update(exp_store: ExperimentStore, site: str, trainer: LocalTrainer) -> EncodedUpdate:
    """A site's step-0 update, trained in process (the HTTP path is tested in test_app.py)."""
    payload, manifest = model_for_site(exp_store, site, 0, 0)
    [item] = pending_work(exp_store.store, site)
    return run_site_step(item.ticket, payload, manifest, trainer, site, "exp1", exp_store.config_hash())


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory, trainers: dict[str, LocalTrainer]) -> Iterator[str]:
    """Base URL of the pages over a store with one closed round and step 1 open."""
    store = LocalFolderStore(tmp_path_factory.mktemp("ui") / "store")
    exp_store = start(store, rounds=2)
    for site in ("site-a", "site-b"):
        encoded = local_update(exp_store, site, trainers[site])
        accept_in_time(exp_store, site, 0, encoded.payload, encoded.manifest.to_json())
    report_site_failure(exp_store, "site-c", 0, 0, REASON)
    aggregate_step(exp_store, 0)
    dispatch_step(exp_store, 1)
    store.put_bytes("experiments/broken/state.json", b"{}")
    app = FastAPI()
    app.include_router(ui_router(lambda: store), prefix="/ui")
    url, stop = serve_in_thread(app)
    yield f"{url}/ui"
    stop()


def test_list_shows_status_and_progress(pages: str) -> None:
    text = requests.get(f"{pages}/experiments", timeout=10).text
    assert "<a href='experiments/exp1'>exp1</a>" in text
    assert "running" in text and "step 1 of 2 (round 1 of 2)" in text
    assert "broken" in text and "unreadable" in text


def test_experiment_page_has_the_round_table_and_the_open_step(pages: str) -> None:
    answer = requests.get(f"{pages}/experiments/exp1", timeout=10)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    text = answer.text
    assert "<td>0</td><td>site-a, site-b</td>" in text
    assert "<b>site-c</b>: fetch_dicom failed: &lt;PACS&gt; unreachable" in text and "<PACS>" not in text
    assert re.search(r"<td>\d+</td><td>0\.\d{4}</td></tr>", text), "no weighted val Dice in the round row"
    assert "weighted val_dice_mean" in text and "<img src='exp1/plot.png'" in text
    assert "Open step 1 (round 1)" in text and "<td>site-a</td><td>waiting</td>" in text


def test_plot_is_a_png_and_unknown_experiments_are_404(pages: str) -> None:
    plot = requests.get(f"{pages}/experiments/exp1/plot.png", timeout=30)
    assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert requests.get(f"{pages}/experiments/nope", timeout=10).status_code == 404
    assert requests.get(f"{pages}/experiments/nope/plot.png", timeout=10).status_code == 404
