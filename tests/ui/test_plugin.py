"""The JIP Federated plugin in a real `airflow standalone` (Airflow 3): endpoint, site tokens, pages,
and a real browser (Debian's chromium, headless) reading them inside Airflow's UI; on Airflow 2.11
(.venv-af2): the pages as an appbuilder view behind Airflow's login. One Airflow for the file
(pytest-xdist --dist loadfile keeps a file on one worker).

The API server reads the model store Connection (an AIRFLOW_CONN_* variable, conn_type fs) and
the site token secret (``[jipfed] site_token_secret``) per request. Sites talk to
``/jipfed/v1`` with their token; the experiment pages need Airflow's own authentication.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image

from jipfed.central.client import CentralClient, CentralError
from jipfed.central.tokens import site_token
from jipfed.federation.codec import EncodedUpdate, encode_update
from jipfed.federation.dispatch import dispatch_step, experiments_in
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.rounds import aggregate_step, initial_weights, start_experiment
from jipfed.federation.update import ModelUpdate
from jipfed.storage.state import ExperimentStore
from jipfed.testing.airflow import AirflowStandalone
from jipfed.training.config import TrainConfig

from .chromium import Chromium
from .conftest import Airflow

REPO = Path(__file__).resolve().parents[2]
AF2_PYTHON = REPO / ".venv-af2" / "bin" / "python"
SITES = ("site-a", "site-b", "site-c")
REASON = "fetch_dicom failed: PACS unreachable"
CONFIG = ExperimentConfig(
    name="exp1",
    sites=SITES,
    rounds=2,
    train=TrainConfig(size="tiny", steps=1, batch_size=2, amp=False, augment=False),
    min_sites=2,
)


@dataclass
class Central:
    """The shared Airflow (tests/ui/conftest.py) with experiment ``exp1`` started in its store."""

    standalone: AirflowStandalone
    exp_store: ExperimentStore
    secret: str

    @property
    def url(self) -> str:
        return f"{self.standalone.base_url}/jipfed"

    def client(self, site: str) -> CentralClient:
        return CentralClient(self.url, site_token(self.secret, site), timeout_s=30, backoff_s=0.1)

    def jwt(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.standalone.client.token()}"}


@pytest.fixture(scope="module")
def central(airflow: Airflow) -> Central:
    exp_store = ExperimentStore(airflow.store, CONFIG.name)
    start_experiment(exp_store, CONFIG)
    dispatch_step(exp_store, 0)
    return Central(airflow.standalone, exp_store, airflow.secret)


def exp1_work(client: CentralClient) -> list:
    """The client's pending work of exp1 (the store's ``running`` experiment has open work too)."""
    return [item for item in client.pending_work() if item.ticket.experiment == CONFIG.name]


def zero_update(central: Central, site: str) -> EncodedUpdate:
    """A valid update that changes nothing (the round-0 model is the seeded initial weights)."""
    delta = {name: torch.zeros_like(value) for name, value in initial_weights(CONFIG).items()}
    update = ModelUpdate.build(
        delta,
        experiment=CONFIG.name,
        round=0,
        site=site,
        kind="delta",
        n_samples=3,
        config_hash=central.exp_store.config_hash(),
        metrics={"val_dice_mean": 0.25 if site == "site-a" else 0.75},
    )
    return encode_update(update)


@pytest.mark.slow
def test_plugin_is_registered_with_a_nav_entry(central: Central) -> None:
    plugins = requests.get(f"{central.standalone.base_url}/api/v2/plugins", headers=central.jwt(), timeout=30)
    [plugin] = [p for p in plugins.json()["plugins"] if p["name"] == "jipfed"]
    assert [app["url_prefix"] for app in plugin["fastapi_apps"]] == ["/jipfed"]
    assert [(v["href"], v["url_route"], v["destination"]) for v in plugin["external_views"]] == [
        ("/jipfed/ui/experiments", "jipfed-experiments", "nav"),
        ("/jipfed/ui/lines/", "jipfed-lines", "nav"),
        ("/jipfed/ui/runs/{DAG_ID}/{RUN_ID}", "jipfed-run", "dag_run"),
    ]
    assert requests.get(f"{central.url}/healthz", timeout=60).json() == {"status": "ok"}


@pytest.mark.slow
def test_sites_work_a_round_through_the_api_server(central: Central) -> None:
    clients = {site: central.client(site) for site in SITES}
    for site in ("site-a", "site-b"):
        [item] = exp1_work(clients[site])
        assert (item.ticket.experiment, item.ticket.step) == ("exp1", 0)
        payload, manifest = clients[site].get_model("exp1", 0, 0)
        assert manifest["sha256"] == item.ticket.model_sha256
        encoded = zero_update(central, site)
        assert (
            clients[site].put_update("exp1", 0, encoded.payload, encoded.manifest.to_json())["site"] == site
        )
    clients["site-c"].report_failure("exp1", 0, 0, REASON, task="fetch_dicom")  # sent sanitised
    assert all(exp1_work(client) == [] for client in clients.values())

    no_token = requests.get(f"{central.url}/v1/work", timeout=30)
    assert (no_token.status_code, no_token.headers["WWW-Authenticate"]) == (401, "Bearer")
    with pytest.raises(CentralError, match="403 bad_token"):
        CentralClient(central.url, site_token("x" * 32, "site-a")).pending_work()
    # An Airflow JWT is not a site token.
    assert requests.get(f"{central.url}/v1/work", headers=central.jwt(), timeout=30).status_code == 403

    aggregate_step(central.exp_store, 0)
    dispatch_step(central.exp_store, 1)
    assert [w.ticket.step for w in exp1_work(clients["site-a"])] == [1]


@pytest.mark.slow
def test_experiment_pages_need_airflow_auth(central: Central) -> None:
    if not central.exp_store.store.exists(central.exp_store.layout.aggregate(0)):
        pytest.fail("needs the round closed by test_sites_work_a_round_through_the_api_server")
    page = f"{central.url}/ui/experiments/exp1"
    assert requests.get(page, timeout=30).status_code == 401
    site = {"Authorization": f"Bearer {site_token(central.secret, 'site-a')}"}
    assert requests.get(page, headers=site, timeout=30).status_code == 403
    answer = requests.get(page, headers=central.jwt(), timeout=30)
    assert answer.status_code == 200
    assert "<b id='progress'>1 of 2 rounds closed</b>" in answer.text
    assert (
        f"title='missing: connection in fetch_dicom: {REASON}' data-site='site-c' data-round='0'"
        in answer.text
    )
    assert "<td class='num metric'>0.5000</td>" in answer.text  # (3 x 0.25 + 3 x 0.75) / 6
    assert "href='/dags/jipfed_central/runs/jipfed__exp1__step0000'>step 0</a>" in answer.text
    listing = requests.get(f"{central.url}/ui/experiments", headers=central.jwt(), timeout=30)
    assert "1 of 2 rounds closed (step 1 of 2)" in listing.text
    script = f"{central.url}/ui/static/uplot/uPlot.iife.min.js"
    assert requests.get(script, timeout=30).status_code == 401
    assert requests.get(script, headers=central.jwt(), timeout=30).content.startswith(
        b"/*! https://github.com/leeoniya/uPlot"
    )
    run_tab = requests.get(
        f"{central.url}/ui/runs/jipfed_central/jipfed__exp1__step0001",
        headers=central.jwt(),
        timeout=30,
        allow_redirects=False,
    )
    assert (run_tab.status_code, run_tab.headers["location"]) == (307, "/jipfed/ui/experiments/exp1")
    assert requests.post(page, headers=central.jwt(), timeout=30).status_code == 405  # read-only
    lines = f"{central.url}/ui/lines/"
    assert requests.get(lines, timeout=30).status_code == 401
    assert requests.get(lines, headers=central.jwt(), timeout=30).status_code == 200
    # The UI's session cookie works as well (what the nav entry's iframe sends).
    cookie = requests.get(page, cookies={"_token": central.standalone.client.token()}, timeout=30)
    assert cookie.status_code == 200


AIRFLOW2_VIEW_CHECK = """
import json
from airflow import plugins_manager
from airflow.utils import db
from airflow.www.app import create_app

db.initdb()
plugins_manager.ensure_plugins_loaded()
[plugin] = [p for p in plugins_manager.plugins if p.name == "jipfed"]
app = create_app(testing=True)
app.config["WTF_CSRF_ENABLED"] = False
sm = app.appbuilder.sm
sm.add_user("viewer", "V", "User", "viewer@example.org", sm.find_role("Viewer"), password="pw-viewer")
client = app.test_client()
out = {"errors": plugins_manager.import_errors, "fastapi_apps": getattr(plugin, "fastapi_apps", None)}
anonymous = client.get("/jipfed/experiments/exp1")
out["anonymous"] = [anonymous.status_code, anonymous.headers.get("Location")]
out["login"] = client.post("/login/", data={"username": "viewer", "password": "pw-viewer"}).status_code
for name, url in [("list", "/jipfed/experiments"), ("experiment", "/jipfed/experiments/exp1"),
                  ("missing", "/jipfed/experiments/nope"), ("post", "/jipfed/experiments")]:
    answer = client.post(url) if name == "post" else client.get(url)
    out[name] = [answer.status_code, answer.get_data(as_text=True)]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_airflow2_view_shows_the_pages_inside_airflow_after_login(central: Central, tmp_path: Path) -> None:
    if not AF2_PYTHON.exists():
        pytest.fail(f"{AF2_PYTHON} is missing: create it with `make setup` (scripts/setup.sh)")
    if not central.exp_store.store.exists(central.exp_store.layout.aggregate(0)):
        pytest.fail("needs the round closed by test_sites_work_a_round_through_the_api_server")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_"))}
    env.update(
        {
            "AIRFLOW_HOME": str(tmp_path),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW_CONN_JIPFED_MODEL_STORE_DEFAULT": json.dumps(
                {"conn_type": "fs", "extra": {"path": str(central.exp_store.store.root)}}
            ),
        }
    )
    done = subprocess.run(
        [str(AF2_PYTHON), "-W", "ignore", "-c", AIRFLOW2_VIEW_CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert (out["errors"], out["fastapi_apps"]) == ({}, None)
    assert out["anonymous"][0] == 302 and out["anonymous"][1].startswith("/login/")
    assert out["login"] == 302
    status, text = out["list"]
    assert status == 200 and "<a href='/jipfed/experiments/exp1'>exp1</a>" in text
    assert "Log Out" in text and "Federated experiments" in text  # Airflow's own layout and menu around it
    status, text = out["experiment"]
    assert status == 200 and "<h1>Experiment exp1</h1>" in text and "/jipfed/static/jipfed-charts.js" in text
    assert "href='/dags/jipfed_central/grid?dag_run_id=jipfed__exp1__step0000'" in text
    assert out["missing"][0] == 404 and out["post"][0] == 405


# -- a real browser: Debian's chromium, headless, over the DevTools protocol ---------------------

FRAME = "document.querySelector('iframe').contentDocument"


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
    airflow: Airflow, central: Central, tmp_path: Path
) -> None:
    standalone, ui_store = airflow.standalone, airflow.store
    base = standalone.base_url
    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"screenshots in {shots}")
    with Chromium(tmp_path / "chromium") as browser:
        browser.open(f"{base}/jipfed/ui/experiments")  # no login yet: refused
        assert "Not authenticated" in browser.js("document.body.innerText")

        browser.open(f"{base}/auth/login")
        browser.type_into("input[name=username]", standalone.username)
        browser.type_into("input[name=password]", standalone.password)
        browser.js("document.querySelector('button[type=submit]').click()")
        browser.wait_for("document.cookie.includes('_token=')")

        # The list, inside Airflow's UI (the nav entry's page frames it).
        browser.open(f"{base}/plugin/jipfed-experiments")
        names = experiments_in(ui_store)  # the store's experiments (exp1 and the ui_store's)
        assert {"broken", "fedavg", "fedprox", "running"} <= set(names)
        rows = f"{FRAME}.querySelectorAll('table.experiments tbody tr').length"
        browser.wait_for(f"{FRAME} && {rows} === {len(names)}")
        assert frame_texts(browser, "table.experiments tbody tr td:nth-child(2)") == names
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
