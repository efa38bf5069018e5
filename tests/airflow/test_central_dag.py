"""The central DAG: structure on Airflow 3.3 and 2.11, Params, the collect trigger, and real runs.

The runs use ``dag.test()`` (Airflow 3.3, in a subprocess) against a local-folder model store (the
push chain in a real ``airflow standalone`` is tested end to end in tests/e2e/). The sites are simulated by a thread in
the test process that does what the site DAG does through the central endpoint: it polls
``pending_work``, downloads the model (``model_for_site``), trains a tiny U-Net on synthetic cases
(``run_site_step``) and uploads the update (``accept_in_time``) — or reports a failure.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import shutil
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from jipfed.operators.central import next_run_id
from jipfed.operators.compat import TaskSuccessEvent
from jipfed.operators.triggers.site_update import ERROR, SiteUpdateTrigger

from jipfed.federation.dispatch import (
    DELIVERED,
    FAILED,
    TIMED_OUT,
    WorkItem,
    accept_in_time,
    dispatch_step,
    model_for_site,
    pending_work,
    report_site_failure,
    utcnow,
)
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.rounds import start_experiment
from jipfed.federation.site_round import run_site_step
from jipfed.storage.base import ModelStore
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore, Status
from jipfed.testing.airflow import (
    RESULT_MARKER,
    check_dag_folder,
    run_airflow_script,
    run_dag_test,
)
from jipfed.training.config import TrainConfig
from jipfed.training.data import SiteData
from jipfed.training.local import LocalTrainer
from tests.training.synth import write_site

REPO = Path(__file__).resolve().parents[2]
DAG_FILE = REPO / "dags" / "jipfed_central.py"
DAG_ID = "jipfed_central"
AF2_PYTHON = REPO / ".venv-af2" / "bin" / "python"
SITES = ("site-a", "site-b", "site-c")
STORE_CONN_ENV = "AIRFLOW_CONN_JIPFED_MODEL_STORE_DEFAULT"
#: A small, fast experiment: tiny U-Net, one local step, short round timeout.
FAST = {
    "sites": list(SITES),
    "rounds": 2,
    "model_size": "tiny",
    "local_steps": 1,
    "batch_size": 2,
    "learning_rate": 0.01,
    "round_timeout_s": 120,
    "transport": "pull",
}


# -- helpers ---------------------------------------------------------------------------------------


def fs_connection(root: Path) -> str:
    """A model store Connection (conn_type fs) as an AIRFLOW_CONN_* value."""
    return json.dumps({"conn_type": "fs", "extra": {"path": str(root)}})


@pytest.fixture
def dags(tmp_path: Path) -> Path:
    """A DAGs folder with only the central DAG (the site DAG is not needed here)."""
    folder = tmp_path / "dags"
    folder.mkdir()
    shutil.copy(DAG_FILE, folder / DAG_FILE.name)
    return folder


@pytest.fixture(scope="module")
def af3_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("af3-home")


_RUN_SCRIPT = """
import json
from airflow.utils.session import create_session
from sqlalchemy import select
try:
    from airflow.dag_processing.dagbag import DagBag
except ImportError:
    from airflow.models.dagbag import DagBag
from airflow.models.dagrun import DagRun

results = []
for conf in json.loads({confs!r}):
    bag = DagBag({folder!r})  # parsed again: dag.test keeps a run's conf in the DAG's params
    assert not bag.import_errors, bag.import_errors
    dag = bag.get_dag({dag_id!r})
    try:
        run = dag.test(run_conf=conf)
    except Exception as exc:
        results.append({{"error": type(exc).__name__, "message": str(exc)[:2000]}})
        continue
    results.append({{
        "state": str(getattr(run.state, "value", run.state)),
        "tasks": {{f"{{ti.task_id}}[{{ti.map_index}}]": str(getattr(ti.state, "value", ti.state))
                  for ti in run.get_task_instances()}},
    }})
with create_session() as session:
    runs = session.scalars(select(DagRun).where(DagRun.dag_id == {dag_id!r})).all()
    listed = [{{"run_id": r.run_id, "conf": r.conf, "state": str(getattr(r.state, "value", r.state))}}
              for r in runs]
print({marker!r} + json.dumps({{"results": results, "runs": listed}}))
"""


def run_central(
    dags: Path, home: Path, confs: list[Mapping[str, Any]], *, env: Mapping[str, str]
) -> dict[str, Any]:
    """``dag.test(run_conf=conf)`` of the central DAG for each conf in one Airflow 3 process.

    Returns ``{"results": [{"state", "tasks"} | {"error", "message"}], "runs": [{"run_id", "conf",
    "state"}]}`` (``runs``: every run of the DAG in the database, including triggered ones).
    """
    script = _RUN_SCRIPT.format(
        folder=str(dags), dag_id=DAG_ID, confs=json.dumps(list(confs)), marker=RESULT_MARKER
    )
    return run_airflow_script(sys.executable, script, home=home, dags_folder=dags, env=env, timeout_s=900)


class SimulatedSites:
    """Sites answering their work through the store functions the central endpoint calls for them.

    Args:
        store: The central model store.
        data: site → folder of synthetic cases.
        failing: site → the failure it reports instead of training.
        ready: ``ready(site, item)`` says whether the site answers the item now (default: always).
    """

    def __init__(
        self,
        store: ModelStore,
        data: Mapping[str, Path],
        failing: Mapping[str, str] = (),
        ready: Callable[[str, WorkItem], bool] | None = None,
    ) -> None:
        self.store = store
        self.data = dict(data)
        self.failing = dict(failing)
        self.ready = ready
        self.answered: list[tuple[str, str, int]] = []
        self.errors: list[str] = []
        self.polls = 0  # full passes over every site's pending work
        self._polled = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="simulated-sites", daemon=True)

    def __enter__(self) -> SimulatedSites:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        torch.set_num_threads(1)
        while not self._stop.is_set():
            for site in self.data:
                try:
                    for item in pending_work(self.store, site):
                        if self.ready is None or self.ready(site, item):
                            self._answer(site, item)
                except Exception as exc:  # the test asserts the list is empty
                    self.errors.append(f"{site}: {type(exc).__name__}: {exc}")
                    return
            with self._polled:
                self.polls += 1
                self._polled.notify_all()
            self._stop.wait(0.2)

    def wait_for_polls(self, n: int, timeout_s: float = 120.0) -> None:
        """Wait until ``n`` more full passes over the sites' pending work have ended."""
        with self._polled:
            target = self.polls + n
            assert self._polled.wait_for(lambda: self.polls >= target, timeout_s), (self.polls, self.errors)

    def _answer(self, site: str, item: WorkItem) -> None:
        ticket = item.ticket
        exp_store = ExperimentStore(self.store, ticket.experiment)
        if site in self.failing:
            report_site_failure(exp_store, site, ticket.round, ticket.step, self.failing[site])
        else:
            payload, manifest = model_for_site(exp_store, site, ticket.round, ticket.step)
            train = TrainConfig.from_dict(item.config["train"])
            trainer = LocalTrainer(train, SiteData.from_dir(self.data[site], group=site), device="cpu")
            encoded = run_site_step(
                ticket, payload, manifest, trainer, site, ticket.experiment, ticket.config_hash
            )
            accept_in_time(exp_store, site, ticket.round, encoded.payload, encoded.manifest.to_json())
        self.answered.append((ticket.experiment, site, ticket.step))


@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("site-data")
    return {site: write_site(root / site, 4, seed=i, size=16, prefix=str(i)) for i, site in enumerate(SITES)}


def listing(store: ModelStore, experiment: str) -> dict[str, bytes]:
    """Every object of an experiment with its bytes."""
    return {key: store.get_bytes(key) for key in store.list(f"experiments/{experiment}/")}


def started_experiment(root: Path, name: str = "exp-trigger", **overrides: Any) -> ExperimentStore:
    """A started experiment (tiny U-Net) in a local folder store under ``root``."""
    values: dict[str, Any] = {
        "name": name,
        "sites": SITES,
        "rounds": 1,
        "train": TrainConfig(size="tiny", steps=1),
        "round_timeout_s": 60.0,
    }
    values.update(overrides)
    exp_store = ExperimentStore(LocalFolderStore(root), name)
    start_experiment(exp_store, ExperimentConfig(**values))
    return exp_store


# -- the collect trigger -----------------------------------------------------------------------------


def test_trigger_serializes_to_its_installed_classpath() -> None:
    trigger = SiteUpdateTrigger(
        experiment="exp-1", site="site-a", round=2, step=3, model_store_conn_id="store", poll_interval_s=5
    )
    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    assert module == "jipfed.operators.triggers.site_update"  # importable by the triggerer
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)
    assert json.loads(json.dumps(kwargs)) == kwargs
    assert kwargs == {
        "experiment": "exp-1",
        "site": "site-a",
        "round": 2,
        "step": 3,
        "model_store_conn_id": "store",
        "poll_interval_s": 5.0,
    }
    with pytest.raises(ValueError, match="poll_interval_s"):
        SiteUpdateTrigger(
            experiment="e", site="s", round=0, step=0, model_store_conn_id="c", poll_interval_s=0
        )


def first_event(trigger: SiteUpdateTrigger, timeout_s: float = 20.0) -> dict[str, Any]:
    """The payload of the trigger's first event; a delivery's ends the task in the triggerer."""

    async def run() -> dict[str, Any]:
        events = trigger.run()
        try:
            event = await asyncio.wait_for(events.__anext__(), timeout_s)
        finally:
            await events.aclose()
        if isinstance(event, TaskSuccessEvent):
            return {"ends_task": True, **event.xcoms["return_value"]}
        return event.payload

    return asyncio.run(run())


def test_trigger_waits_then_reports_each_outcome(
    tmp_path: Path, site_data: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    monkeypatch.setenv("AIRFLOW_CONN_TRIGGER_STORE", fs_connection(tmp_path / "store"))
    exp_store = started_experiment(tmp_path / "store")

    def trigger(site: str, experiment: str = "exp-trigger") -> SiteUpdateTrigger:
        return SiteUpdateTrigger(
            experiment=experiment,
            site=site,
            round=0,
            step=0,
            model_store_conn_id="trigger_store",
            poll_interval_s=0.1,
        )

    assert first_event(trigger("site-a"))["status"] == ERROR  # not dispatched yet
    dispatch_step(exp_store, 0)
    with SimulatedSites(exp_store.store, {"site-a": site_data["site-a"]}) as sites:
        delivered = first_event(trigger("site-a"))  # polls while the site trains
    assert sites.errors == [] and sites.answered == [("exp-trigger", "site-a", 0)]
    assert delivered == {
        "ends_task": True,  # the task succeeds in the triggerer, no worker resumes it
        "status": DELIVERED,
        "detail": "update of site-a for round 0 received",
        "experiment": "exp-trigger",
        "site": "site-a",
        "round": 0,
        "step": 0,
    }
    report_site_failure(exp_store, "site-b", 0, 0, "convert failed: no DICOM in series")
    failed = first_event(trigger("site-b"))
    assert (failed["status"], failed["detail"]) == (FAILED, "convert failed: no DICOM in series")
    with pytest.raises(TimeoutError):  # site-c has not answered: before the deadline the trigger waits
        first_event(trigger("site-c"), timeout_s=0.5)
    short = started_experiment(tmp_path / "store", "exp-short", round_timeout_s=1.0)
    short_dispatch = dispatch_step(short, 0)
    timed_out = first_event(trigger("site-c", "exp-short"))
    assert timed_out["status"] == TIMED_OUT and "deadline" in timed_out["detail"]
    assert utcnow() >= short_dispatch.deadline  # it fired only once the deadline had passed


def test_trigger_reports_a_store_it_cannot_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_BAD_STORE", json.dumps({"conn_type": "http", "host": "x"}))
    event = first_event(
        SiteUpdateTrigger(
            experiment="e", site="site-a", round=0, step=0, model_store_conn_id="bad_store", poll_interval_s=1
        )
    )
    assert (
        event["status"] == ERROR and "bad_store" in event["detail"] and "not a model store" in event["detail"]
    )


# -- routing -----------------------------------------------------------------------------------------


def test_next_run_id_names_the_experiment_and_step() -> None:
    assert next_run_id("exp-1", 12) == "jipfed__exp-1__step0012"


# -- the DAG on Airflow 3.3 and 2.11 -------------------------------------------------------------------

_STRUCTURE_SCRIPT = """
import json
try:
    from airflow.dag_processing.dagbag import DagBag
except ImportError:
    from airflow.models.dagbag import DagBag
bag = DagBag({folder!r})
dag = bag.get_dag({dag_id!r})
print({marker!r} + json.dumps({{
    "import_errors": {{str(k): str(v) for k, v in bag.import_errors.items()}},
    "max_active_runs": dag.max_active_runs,
    "schedule": str(getattr(dag, "timetable", None).__class__.__name__),
    "params": sorted(dag.params.keys()),
    "ui_forms": sorted(dag.default_args["ui_forms"]["workflow_form"]["properties"]),
    "tasks": {{
        t.task_id: {{
            "type": type(t).__name__,
            "operator": t.task_type,
            "trigger_rule": str(getattr(t.trigger_rule, "value", t.trigger_rule)),
            "downstream": sorted(t.downstream_task_ids),
        }}
        for t in dag.tasks
    }},
}}))
"""

EXPECTED_TASKS = {
    # the critical path is open_step -> collect_update (mapped) -> close_step; the report runs beside
    # it, as a second leaf: its failure fails the run
    "open_step": ("OpenStepOperator", "all_success", ["close_step", "collect_update", "record_metrics"]),
    "collect_update": ("CollectUpdateSensor", "all_success", ["close_step"]),
    "record_metrics": ("RecordMetricsOperator", "all_success", []),
    "close_step": ("CloseStepOperator", "all_done", []),
}


def dag_structure(python: Path, home: Path) -> dict[str, Any]:
    script = _STRUCTURE_SCRIPT.format(folder=str(DAG_FILE.parent), dag_id=DAG_ID, marker=RESULT_MARKER)
    return run_airflow_script(python, script, home=home, dags_folder=DAG_FILE.parent)


@pytest.mark.parametrize("airflow_major", [3, 2])
def test_dag_imports_and_has_the_same_shape_on_airflow_3_and_2(
    airflow_major: int, af3_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if airflow_major == 2 and not AF2_PYTHON.exists():
        pytest.fail(f"{AF2_PYTHON} is missing: run `make setup` (scripts/setup.sh)", pytrace=False)
    python = Path(sys.executable) if airflow_major == 3 else AF2_PYTHON
    home = af3_home if airflow_major == 3 else tmp_path_factory.mktemp("af2-home")
    assert DAG_ID in check_dag_folder(python, DAG_FILE.parent, home=home)
    shape = dag_structure(python, home)
    assert shape["import_errors"] == {}
    assert shape["max_active_runs"] == 1
    assert shape["schedule"] == "NullTimetable"
    assert "step" in shape["params"] and "experiment" in shape["params"]
    assert set(shape["ui_forms"]) == set(shape["params"]) - {"step"}
    tasks = {tid: (t["operator"], t["trigger_rule"], t["downstream"]) for tid, t in shape["tasks"].items()}
    assert tasks == EXPECTED_TASKS
    mapped = {tid for tid, t in shape["tasks"].items() if "Mapped" in t["type"]}
    assert mapped == {"collect_update"}


def test_invalid_conf_is_refused_before_any_task_runs(dags: Path, af3_home: Path, tmp_path: Path) -> None:
    env = {STORE_CONN_ENV: fs_connection(tmp_path / "store")}
    bad = [
        {"experiment": "exp-bad", "strategy": "fedsgd"},
        {"experiment": "exp-bad", "rounds": 0},
        {"experiment": "bad/name"},
        {"experiment": "exp-bad", "sites": ["site-a", "site a"]},
    ]
    out = run_central(dags, af3_home, bad, env=env)
    assert [r.get("error") for r in out["results"]] == ["ParamValidationError"] * len(bad)
    messages = [r["message"] for r in out["results"]]
    for word, message in zip(["strategy", "rounds", "experiment", "sites"], messages, strict=True):
        assert word in message, message
    names = {conf["experiment"] for conf in bad}
    assert [r for r in out["runs"] if r["conf"].get("experiment") in names] == []  # no run was created
    assert not (tmp_path / "store").exists()  # nothing touched the store


# -- real runs with dag.test() (Airflow 3.3) -----------------------------------------------------------


def only(out: Mapping[str, Any]) -> dict[str, Any]:
    """The single run result of ``run_central``; its tasks as ``{task[map_index]: state}``."""
    (result,) = out["results"]
    assert "error" not in result, result
    return result


def skipped_except(tasks: Mapping[str, str], *ran: str) -> bool:
    """Whether exactly the tasks ``ran`` succeeded and every other task was skipped."""
    return {t for t, s in tasks.items() if s == "success"} == set(ran) and all(
        s == "skipped" for t, s in tasks.items() if t not in ran
    )


@pytest.mark.slow
def test_steps_run_one_per_run_with_quorum_and_reruns_repeat_nothing(
    dags: Path, af3_home: Path, tmp_path: Path, site_data: dict[str, Path]
) -> None:
    store = LocalFolderStore(tmp_path / "store")
    env = {STORE_CONN_ENV: fs_connection(tmp_path / "store")}
    form = {"experiment": "exp-chain", "min_sites": 2, **FAST}
    reason = "fetch_dicom failed: PACS unreachable"
    exp_store = ExperimentStore(store, "exp-chain")
    # the report cannot be written in step 0's run: a file where its folder goes
    blocker = tmp_path / "store" / "experiments" / "exp-chain" / "report"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder")
    with SimulatedSites(store, site_data, failing={"site-c": reason}) as sites:
        # step 0: site-c reports a failure, the quorum of 2 is met
        step0 = only(run_central(dags, af3_home, [form], env=env))
        # the failed report fails the run, but the step is closed and the next one opened
        assert step0["state"] == "failed"
        assert step0["tasks"]["record_metrics[-1]"] == "failed"
        assert step0["tasks"]["collect_update[2]"] == "skipped"  # site-c
        assert step0["tasks"]["close_step[-1]"] == "success"
        record = exp_store.load_aggregate(0)
        assert record["included"] == ["site-a", "site-b"]
        assert record["missing_reasons"] == {"site-c": reason}
        assert exp_store.has_global(1) and exp_store.load_state().next_step == 1
        # close_step opened step 1 at once, before the next run: the sites already have it
        assert exp_store.load_dispatch(1, 1)["attempt"] == 0
        assert not store.exists("experiments/exp-chain/report/metrics.json")  # nothing reported
        blocker.unlink()

        # step 1: the run the chain triggered (dag.test only creates it; the test runs its conf)
        out = run_central(dags, af3_home, [{"experiment": "exp-chain", "step": 1}], env=env)
        triggered = [r for r in out["runs"] if r["run_id"] == next_run_id("exp-chain", 1)]
        assert triggered == [
            {
                "run_id": "jipfed__exp-chain__step0001",
                "conf": {"experiment": "exp-chain", "step": 1},
                "state": "queued",
            }
        ]
        step1 = only(out)
        assert step1["state"] == "success"
        assert step1["tasks"]["close_step[-1]"] == "success"
        assert [r for r in out["runs"] if r["run_id"] == next_run_id("exp-chain", 2)] == []  # the last step
        state = exp_store.load_state()
        assert (
            state.status is Status.FINISHED
            and [r.included for r in state.history] == [("site-a", "site-b")] * 2
        )
        assert store.exists("experiments/exp-chain/final/model.safetensors")
        # finalize asked every site to score the final model and stored the HTML report beside it
        asked = json.loads(store.get_bytes("experiments/exp-chain/evaluation/final/request.json"))
        assert asked["kind"] == "evaluate" and sorted(asked["sites"]) == sorted(
            exp_store.load_config()["sites"]
        )
        stored_report = store.get_bytes("experiments/exp-chain/final/report.html")
        assert b"Still scoring at: " in stored_report and b"scored on every site" not in stored_report
        report = json.loads(store.get_bytes("experiments/exp-chain/report/metrics.json"))
        assert [(r["round"], r["included"], r["missing"]) for r in report["rounds"]] == [
            (0, ["site-a", "site-b"], {"site-c": reason}),
            (1, ["site-a", "site-b"], {"site-c": reason}),
        ]
        assert 0 <= report["rounds"][0]["global"]["val_dice_mean"] <= 1
        assert store.exists("experiments/exp-chain/report/dice.png")
        assert store.exists("experiments/exp-chain/report/metrics.csv")
        answered = list(sites.answered)

        # re-running step 0's conf and the form (same settings) finds the experiment finished
        before = listing(store, "exp-chain")
        again = run_central(dags, af3_home, [{"experiment": "exp-chain", "step": 0}, form], env=env)
        for result in again["results"]:
            assert result["state"] == "success"
            assert skipped_except(result["tasks"], "open_step[-1]"), result["tasks"]
        # other settings under the same name: the run fails at start, nothing is overwritten
        conflict = only(run_central(dags, af3_home, [{**form, "rounds": 3}], env=env))
        assert conflict["state"] == "failed" and conflict["tasks"]["open_step[-1]"] == "failed"
        assert conflict["tasks"]["close_step[-1]"] == "failed"  # the run's leaf: the run shows failed
        sites.wait_for_polls(2)  # two full polls of every site after the runs: new work would be answered
    assert listing(store, "exp-chain") == before
    assert sites.answered == answered == [("exp-chain", s, step) for step in (0, 1) for s in SITES]
    assert sites.errors == []


@pytest.mark.slow
def test_quorum_not_met_fails_the_run_and_leaves_model_and_state_alone(
    dags: Path, af3_home: Path, tmp_path: Path, closed_port: int
) -> None:
    # push transport: no site's Airflow can be reached (a closed port, no Connection at all)
    env = {
        STORE_CONN_ENV: fs_connection(tmp_path / "store"),
        "AIRFLOW_CONN_JIPFED_SITE_SITE-A": json.dumps(
            {"conn_type": "http", "host": "127.0.0.1", "port": closed_port, "login": "u", "password": "p"}
        ),
    }
    store = LocalFolderStore(tmp_path / "store")
    exp_store = ExperimentStore(store, "exp-quorum")
    result = only(
        run_central(dags, af3_home, [{"experiment": "exp-quorum", **FAST, "transport": "push"}], env=env)
    )
    assert result["state"] == "failed"
    tasks = result["tasks"]
    # open_step recorded each site's failure and went on; every collect task skipped
    assert tasks["open_step[-1]"] == "success"
    assert [tasks[f"collect_update[{i}]"] for i in range(3)] == ["skipped"] * 3
    assert tasks["close_step[-1]"] == "failed"
    assert not exp_store.has_global(1)
    assert not store.exists(exp_store.layout.aggregate(0))
    state = exp_store.load_state()
    assert state.status is Status.RUNNING and state.next_step == 0 and state.history == ()
    failures = exp_store.site_failures(0)
    assert sorted(failures) == list(SITES)
    assert {f["source"] for f in failures.values()} == {"central"}
    assert "jipfed_site_site-a" in failures["site-a"]["reason"] and "POST" in failures["site-a"]["reason"]
    assert (
        "jipfed_site_site-b" in failures["site-b"]["reason"]
        and "isn't defined" in failures["site-b"]["reason"]
    )


# -- the collect sensor in poke mode (in the worker, not the triggerer) ---------------------------------

POKE_DAG = '''"""Airflow DAG for a test: CollectUpdateSensor waiting in the worker (not deferrable)."""
import datetime as dt

from jipfed.operators.compat import dag
from jipfed.operators.sensors.collect_update import CollectUpdateSensor


@dag(dag_id="jipfed_collect_poke", schedule=None, start_date=dt.datetime(2024, 1, 1), catchup=False)
def collect_poke():
    CollectUpdateSensor.partial(
        task_id="collect", experiment="exp-poke", step=0, deferrable=False, poll_interval_s=0.5
    ).expand(site=["site-a", "site-b", "site-c"])


collect_poke()
'''


@pytest.mark.slow
def test_collect_sensor_in_poke_mode_reports_each_outcome(
    tmp_path: Path, af3_home: Path, site_data: dict[str, Path]
) -> None:
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "jipfed_collect_poke.py").write_text(POKE_DAG)
    exp_store = started_experiment(tmp_path / "store", "exp-poke", round_timeout_s=25.0)
    dispatch = dispatch_step(exp_store, 0)
    report_site_failure(exp_store, "site-b", 0, 0, "preprocess failed: out of disk space")
    env = {STORE_CONN_ENV: fs_connection(tmp_path / "store")}
    with SimulatedSites(exp_store.store, {"site-a": site_data["site-a"]}) as sites:
        result = run_dag_test(sys.executable, dags, "jipfed_collect_poke", home=af3_home, env=env)
    assert sites.errors == []
    assert result["state"] == "success"
    # site-a delivered, site-b reported a failure, site-c never answered: the sensor poked until the deadline
    assert result["tasks"] == {"collect[0]": "success", "collect[1]": "skipped", "collect[2]": "skipped"}
    failures = exp_store.site_failures(0)
    assert failures["site-b"]["reason"] == "preprocess failed: out of disk space"
    assert failures["site-c"]["source"] == "central" and "timed out" in failures["site-c"]["reason"]
    assert utcnow() >= dispatch.deadline
