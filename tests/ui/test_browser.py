"""A real browser (Debian's chromium, headless, over the DevTools protocol) logs into a running
Airflow 3 (`airflow standalone`, one per module) and reads the experiment pages inside Airflow's UI.

Screenshots are saved under the test's tmp folder (path printed) and checked not to be blank.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore
from jipfed.testing.airflow import AirflowStandalone

from .chromium import Chromium

FRAME = "document.querySelector('iframe').contentDocument"


@pytest.fixture(scope="module")
def airflow(
    ui_store: LocalFolderStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AirflowStandalone]:
    root = tmp_path_factory.mktemp("browser-airflow")
    (root / "dags").mkdir()
    env = {
        "AIRFLOW__JIPFED__SITE_TOKEN_SECRET": "0" * 64,
        "AIRFLOW_CONN_JIPFED_MODEL_STORE_DEFAULT": json.dumps(
            {"conn_type": "fs", "extra": {"path": str(ui_store.root)}}
        ),
    }
    with AirflowStandalone(home=root / "home", dags_folder=root / "dags", env=env) as standalone:
        yield standalone


def assert_not_blank(png: bytes, what: str) -> None:
    """The screenshot has content right of Airflow's nav bar: many colours, not one flat background."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    content = image.crop((80, 0, image.width, image.height))
    colors = content.getcolors(maxcolors=1 << 20) or []
    most = max(count for count, _ in colors)
    assert len(colors) > 50 and most < 0.97 * content.width * content.height, (
        f"{what}: screenshot looks blank"
    )


def frame_texts(browser: Chromium, selector: str) -> list[str]:
    return browser.js(f"Array.from({FRAME}.querySelectorAll({json.dumps(selector)})).map(e => e.textContent)")


@pytest.mark.slow
def test_browser_logs_in_and_reads_list_experiment_and_comparison(
    airflow: AirflowStandalone, ui_store: LocalFolderStore, tmp_path: Path
) -> None:
    base = airflow.base_url
    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"screenshots in {shots}")
    with Chromium(tmp_path / "chromium") as browser:
        browser.open(f"{base}/jipfed/ui/experiments")  # no login yet: refused
        assert "Not authenticated" in browser.js("document.body.innerText")

        browser.open(f"{base}/auth/login")
        browser.type_into("input[name=username]", airflow.username)
        browser.type_into("input[name=password]", airflow.password)
        browser.js("document.querySelector('button[type=submit]').click()")
        browser.wait_for("document.cookie.includes('_token=')")

        # The list, inside Airflow's UI (the nav entry's page frames it).
        browser.open(f"{base}/plugin/jipfed-experiments")
        browser.wait_for(f"{FRAME} && {FRAME}.querySelectorAll('table.experiments tbody tr').length === 4")
        assert frame_texts(browser, "table.experiments tbody tr td:nth-child(2)") == [
            "broken",
            "fedavg",
            "fedprox",
            "running",
        ]
        assert "Browse" in browser.js("document.body.innerText")  # Airflow's navigation around the page
        assert_not_blank(browser.screenshot(shots / "list.png"), "list")

        # One experiment: click its link; its numbers are the model store's.
        browser.js(f"{FRAME}.querySelector(\"a[href$='/experiments/running']\").click()")
        browser.wait_for(
            f"{FRAME}.location.pathname.endsWith('/running') && {FRAME}.querySelectorAll('[data-drawn]').length === 2"
        )
        exp_store = ExperimentStore(ui_store, "running")
        records = [exp_store.load_aggregate(r) for r in (0, 1)]
        assert frame_texts(browser, "td.metric") == [f"{r['metrics']['val_dice_mean']:.4f}" for r in records]
        assert frame_texts(browser, "#progress") == ["2 of 3 rounds closed"]
        why = browser.js(f"{FRAME}.querySelector(\"td[data-site='site-c'][data-round='1']\").title")
        assert why == f"missing: {records[1]['missing_reasons']['site-c']}"
        assert browser.js(f"{FRAME}.querySelectorAll('.chart canvas').length") == 2
        assert_not_blank(browser.screenshot(shots / "experiment.png"), "experiment")

        # A comparison: tick two experiments in the list and submit.
        browser.open(f"{base}/plugin/jipfed-experiments")
        browser.wait_for(f"{FRAME} && {FRAME}.querySelector(\"input[value='fedprox']\") !== null")
        for name in ("fedavg", "fedprox"):
            browser.js(f"{FRAME}.querySelector(\"input[value='{name}']\").click()")
        browser.js(f"{FRAME}.querySelector('form').submit()")
        browser.wait_for(
            f"{FRAME}.location.pathname.endsWith('/compare') && {FRAME}.querySelectorAll('[data-drawn]').length === 2"
        )
        rows = browser.js(
            f"Array.from({FRAME}.querySelectorAll('table.compare-values tbody tr'))"
            ".map(tr => Array.from(tr.cells).map(td => td.textContent))"
        )
        expected = [
            [
                name,
                *(
                    f"{ExperimentStore(ui_store, name).load_aggregate(r)['metrics']['val_dice_mean']:.4f}"
                    for r in (0, 1)
                ),
            ]
            for name in ("fedavg", "fedprox")
        ]
        assert rows == expected
        assert_not_blank(browser.screenshot(shots / "compare.png"), "compare")
