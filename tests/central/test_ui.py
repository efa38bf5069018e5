"""The page router's defaults and the privacy section over a real DP experiment (the other pages over
real experiments: tests/ui/test_pages.py; with Airflow's auth: tests/airflow/test_plugin.py)."""

from __future__ import annotations

from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests
from fastapi import FastAPI
from privacy.helpers import record, simulate_two_sites

from jipfed.central.serve import serve_in_thread
from jipfed.central.ui import ui_router
from jipfed.storage.local import LocalFolderStore


@pytest.fixture(scope="module")
def empty_pages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = LocalFolderStore(tmp_path_factory.mktemp("ui") / "store")
    app = FastAPI()
    app.include_router(ui_router(lambda: store), prefix="/ui")
    url, stop = serve_in_thread(app)
    yield f"{url}/ui"
    stop()


def test_an_empty_store_says_so(empty_pages: str) -> None:
    answer = requests.get(f"{empty_pages}/experiments", timeout=10)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    assert "No experiments in the model store yet." in answer.text


def test_a_run_that_is_no_step_gets_an_escaped_note(empty_pages: str) -> None:
    text = requests.get(f"{empty_pages}/runs/some_dag/manual__<b>", timeout=10).text
    assert "manual__&lt;b&gt; of some_dag is not a step of a federated experiment" in text
    assert "<a href='/ui/experiments'>All experiments</a>" in text


def test_only_get_is_served(empty_pages: str) -> None:
    assert requests.post(f"{empty_pages}/experiments", timeout=10).status_code == 405
    assert requests.get(f"{empty_pages}/compare", timeout=10).status_code == 400


class _Tables(HTMLParser):
    """Cell texts of every table, by its class; and the text of elements with an ``id``."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: list[list[str]] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = self.tables.setdefault(dict(attrs).get("class") or "", [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_the_experiment_page_shows_the_epsilon_the_store_recorded(tmp_path: Path) -> None:
    privacy = {
        "client_dp": {"noise_multiplier": 0.8, "clip_norm": 5.0, "epsilon": 500.0, "delta": 1e-6},
        "sample_dp": {"noise_multiplier": 1.0, "epsilon": 900.0},
    }
    simulate_two_sites(tmp_path, "dpui", privacy)
    records = [record(tmp_path / "sim/store/experiments/dpui/rounds", r) for r in range(2)]
    store = LocalFolderStore(tmp_path / "sim" / "store")
    app = FastAPI()
    app.include_router(ui_router(lambda: store), prefix="/ui")
    url, stop = serve_in_thread(app)
    try:
        text = requests.get(f"{url}/ui/experiments/dpui", timeout=30).text
    finally:
        stop()
    parsed = _Tables()
    parsed.feed(text)
    client = parsed.tables["client-epsilon"]
    assert client[0] == ["round", "ε this round", "ε total", "noise multiplier", "clip norm"]
    for row, rec in zip(client[1:], records, strict=True):
        p = rec["privacy"]
        assert row == [
            str(rec["round"]),
            f"{p['epsilon_round']:.3f}",
            f"{p['epsilon_total']:.3f}",
            f"{p['noise_multiplier']:.3f}",
            f"{p['clip_norm']:.4f}",
        ]
    total = records[-1]["privacy"]["epsilon_total"]
    assert records[0]["privacy"]["epsilon_total"] < total
    assert f"<b class='epsilon-total'>{total:.3f}</b> of budget <span class='epsilon-budget'>500.000" in text
    assert "&delta; = <span class='delta'>1e-06</span>" in text
    sample = parsed.tables["sample-epsilon"]
    assert sample[0] == ["round", "ε site-a", "ε site-b"]
    for row, rec in zip(sample[1:], records, strict=True):
        assert row == [str(rec["round"])] + [
            f"{rec['sites'][s]['dp_epsilon']:.3f}" for s in ("site-a", "site-b")
        ]
    latest = ", ".join(f"{s} {records[-1]['sites'][s]['dp_epsilon']:.3f}" for s in ("site-a", "site-b"))
    assert f"<span class='epsilon-latest'>{latest}</span>" in text
    assert (
        "budget per site <span class='epsilon-budget'>900.000</span> at &delta; = <span class='delta'>1e-05"
        in text
    )
