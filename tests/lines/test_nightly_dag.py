"""The nightly DAG in a real Airflow 3 (``dag.test`` with the logical dates of consecutive nights).

Two sites, each with its own real Orthanc holding synthetic BraTS-like DICOM studies, answer the
line's census, training step and evaluation from threads in this process: they prepare their
cases from their PACS (QIDO-RS cohort, WADO-RS fetch, convert, preprocess) and talk to the central
store only through the functions the central endpoint calls. Between night 1 and night 2 two new
studies are stored in site-a's PACS; night 3 changes the line through the DAG's form to a far too
high learning rate; night 4 finds nothing new.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import torch

from jipfed.imaging.dicomweb import upload_folder
from jipfed.imaging.pipeline import SiteDataConfig, prepare_site
from jipfed.imaging.preprocess import PreprocessConfig
from jipfed.imaging.synth.case import generate_case
from jipfed.imaging.synth.dataset import write_case
from jipfed.imaging.synth.profiles import SiteProfile
from jipfed.lines.census import pending_census
from jipfed.lines.page import render_line_page
from jipfed.lines.site import LineSite
from jipfed.lines.store import LineStore
from jipfed.storage.local import LocalFolderStore
from jipfed.testing.airflow import RESULT_MARKER, run_airflow_script
from jipfed.testing.orthanc import OrthancServer
from jipfed.training.data import SiteData
from tests.lines.conftest import tiny_line

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SITES = ("site-a", "site-b")
SHAPE = (32, 32, 16)
PREPROCESS = PreprocessConfig(spacing_mm=(4.0, 4.0, 4.0), spatial_size=(16, 16, 16))

#: Runs the nights one after the other in one Airflow process; after each it writes
#: ``night-<i>.done`` and waits for the test's ``night-<i>.go`` (or ``stop``).
_NIGHTS_SCRIPT = """
import json, time
from datetime import datetime
from pathlib import Path
try:
    from airflow.dag_processing.dagbag import DagBag
except ImportError:
    from airflow.models.dagbag import DagBag
hand = Path({handshake!r})
for i, (logical, conf) in enumerate(json.loads({nights!r})):
    bag = DagBag({folder!r})  # parsed again: dag.test keeps a run's conf in the DAG's params
    assert not bag.import_errors, bag.import_errors
    run = bag.get_dag("jipfed_nightly").test(logical_date=datetime.fromisoformat(logical), run_conf=conf)
    result = {{
        "state": str(getattr(run.state, "value", run.state)),
        "tasks": {{f"{{ti.task_id}}[{{ti.map_index}}]": str(getattr(ti.state, "value", ti.state))
                  for ti in run.get_task_instances()}},
    }}
    (hand / f"night-{{i}}.done").write_text(json.dumps(result))
    deadline = time.monotonic() + 600
    while not (hand / f"night-{{i}}.go").exists():
        if (hand / "stop").exists() or time.monotonic() > deadline:
            raise SystemExit("stopped by the test")
        time.sleep(0.2)
print({marker!r} + "{{}}")
"""


@dataclass
class PacsSite:
    """A site with its own Orthanc; cases are generated and stored in its PACS on demand."""

    site: str
    pacs: OrthancServer
    root: Path
    n_cases: int = 0
    line_site: LineSite | None = field(default=None, init=False)

    def add_cases(self, n: int) -> None:
        profile = SiteProfile(site_id=self.site, n_cases=self.n_cases + n)
        for index in range(self.n_cases, self.n_cases + n):
            folder = write_case(generate_case(profile, index, shape=SHAPE, seed=3), self.root / "synth")
            upload_folder(self.pacs.pacs_config, folder)
        self.n_cases += n

    def refresh(self) -> LineSite:
        """Prepare every case in the PACS (cached: only new studies are fetched and converted)."""
        cfg = SiteDataConfig(self.site, self.pacs.pacs_config, self.root / "data", preprocess=PREPROCESS)
        report = prepare_site(cfg, progress=False)
        data = SiteData.from_dir(report.preprocessed_dir, group=self.site)
        self.line_site = LineSite(self.site, self.root / "data", data)
        return self.line_site


class SiteThreads:
    """Both sites polling the central store for line work (census, training, evaluation)."""

    def __init__(self, store: LocalFolderStore, sites: list[PacsSite]) -> None:
        self.store, self.sites = store, sites
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> SiteThreads:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _loop(self) -> None:
        torch.set_num_threads(1)
        while not self._stop.is_set():
            for site in self.sites:
                try:
                    if site.line_site is None or pending_census(self.store, site.site):
                        site.refresh()
                    site.line_site.answer(self.store)
                except Exception as exc:  # the test asserts there are none
                    logging.exception("site %s failed", site.site)
                    self.errors.append(f"{site.site}: {type(exc).__name__}: {exc}")
                    return
            self._stop.wait(0.3)


class Nights:
    """The nightly DAG's runs for some logical dates in one Airflow 3 process, paced by the test."""

    def __init__(self, dags: Path, home: Path, env: dict[str, str], nights: list[tuple[int, dict]]) -> None:
        self.hand = home / "handshake"
        self.hand.mkdir(parents=True)
        dates = [
            [datetime(2026, 12, day, 2, 0, tzinfo=timezone.utc).isoformat(), conf] for day, conf in nights
        ]
        script = _NIGHTS_SCRIPT.format(
            folder=str(dags), nights=json.dumps(dates), handshake=str(self.hand), marker=RESULT_MARKER
        )
        self.error: BaseException | None = None

        def run() -> None:
            try:
                run_airflow_script(
                    sys.executable, script, home=home, dags_folder=dags, env=env, timeout_s=900
                )
            except BaseException as exc:  # reported by wait()
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait(self, i: int) -> dict[str, Any]:
        """The result of night ``i`` once its DAG run ended."""
        done = self.hand / f"night-{i}.done"
        while not done.exists():
            assert self.thread.is_alive(), f"the Airflow process ended before night {i}: {self.error}"
            time.sleep(0.2)
        return json.loads(done.read_text())

    def go_on(self, i: int) -> None:
        (self.hand / f"night-{i}.go").touch()

    def stop(self) -> None:
        (self.hand / "stop").touch()
        self.thread.join(timeout=120)


@pytest.fixture(scope="module")
def pacs_sites(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("line-sites")
    with OrthancServer(root / "pacs-a") as pacs_a, OrthancServer(root / "pacs-b") as pacs_b:
        sites = [PacsSite("site-a", pacs_a, root / "site-a"), PacsSite("site-b", pacs_b, root / "site-b")]
        for site in sites:
            site.add_cases(4)
        yield sites


def test_nightly_runs_release_reject_and_skip(pacs_sites: list[PacsSite], tmp_path: Path) -> None:
    dags = tmp_path / "dags"
    dags.mkdir()
    shutil.copy(REPO / "dags" / "jipfed_nightly.py", dags)
    store = LocalFolderStore(tmp_path / "store")
    env = {
        "AIRFLOW_CONN_JIPFED_MODEL_STORE_DEFAULT": json.dumps(
            {"conn_type": "fs", "extra": {"path": str(store.root)}}
        ),
        "JIPFED_LINES_POKE_S": "1",
    }
    lines = LineStore(store, "glioma")
    figures: dict[str, Any] = {}
    line = tiny_line(schedule="0 2 * * *").to_dict()
    bad_train = {**line["experiment"]["train"], "lr": 1000.0, "steps": 3}
    bad = {"name": "glioma", "experiment": {**line["experiment"], "train": bad_train}}
    with SiteThreads(store, pacs_sites) as sites:
        nights = Nights(
            dags, tmp_path / "af3", env, [(5, {"line": line}), (6, {}), (7, {"line": bad}), (8, {})]
        )
        try:
            first = nights.wait(0)
            assert first["state"] == "success", (first, sites.errors)
            (run1,) = lines.runs()
            assert run1["status"] == "released", run1
            assert {s: c["new_cases"] for s, c in run1["census"]["sites"].items()} == {
                "site-a": 4,
                "site-b": 4,
            }
            pacs_sites[0].add_cases(2)
            nights.go_on(0)

            second = nights.wait(1)
            assert second["state"] == "success", (second, sites.errors)
            run2 = lines.runs()[1]
            census = run2["census"]["sites"]
            assert {s: c["new_cases"] for s, c in census.items()} == {"site-a": 2, "site-b": 0}
            for site in SITES:
                trained = run2["trained"]["n_samples"].get(site, 0)
                assert trained == census[site]["train_new"] + census[site]["train_replay"]
            assert run2["parent"] == "v0001" and run2["verdict"]["checks"]["sites"]
            released = lines.released()
            pacs_sites[1].add_cases(2)
            nights.go_on(1)

            third = nights.wait(2)
            assert third["state"] == "success", (third, sites.errors)
            run3 = lines.runs()[2]
            assert run3["status"] == "rejected", run3["verdict"]
            assert lines.released() == released
            nights.go_on(2)

            fourth = nights.wait(3)
            assert fourth["state"] == "success", (fourth, sites.errors)
            run4 = lines.runs()[3]
            assert run4["status"] == "skipped" and "no new cases" in run4["reason"]
            assert not sites.errors, sites.errors
            nights.go_on(3)
        finally:
            nights.stop()
        assert nights.error is None, nights.error

    versions = lines.versions()
    assert [v["status"] for v in versions][2] == "rejected" and len(versions) == 3
    page = render_line_page(store, "glioma")
    for version in versions:
        assert version["version"] in page and version["status"] in page
    for run in (run1, run2, run3):
        figures[run["slot"]] = {
            "census": {s: c for s, c in run["census"]["sites"].items()},
            "trained": run["trained"]["n_samples"],
            "weighted": run["evaluation"]["weighted"],
            "verdict": run["verdict"]["reasons"],
            "status": run["status"],
        }
    figures[run4["slot"]] = {"status": run4["status"], "reason": run4["reason"]}
    print("line figures:", json.dumps(figures, indent=1))  # the report's figures (pytest -s)
