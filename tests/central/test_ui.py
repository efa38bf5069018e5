"""The page router's defaults (the pages over real experiments: tests/ui/test_pages.py; with
Airflow's auth: tests/airflow/test_plugin.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from fastapi import FastAPI

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
