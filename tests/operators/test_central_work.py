"""Pull mode and the central calls of the site tasks, against a real central endpoint (uvicorn).

CentralWorkTrigger runs its ``run()`` here in an event loop as the triggerer would; the sensor,
``find_work`` and ``upload_update`` talk to the same served endpoint over HTTP.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import torch
from jipfed.operators.compat import (
    AirflowFailException,
    AirflowSkipException,
    PokeReturnValue,
)
from jipfed.operators.sensors.central_work import CentralWorkError, CentralWorkSensor
from jipfed.operators.site.work import find_work
from jipfed.operators.triggers.central_work import CentralWorkTrigger, ask_for_work

from jipfed.central.app import create_app
from jipfed.central.client import CentralClient, CentralRefused
from jipfed.central.serve import serve_in_thread
from jipfed.central.tokens import site_token
from jipfed.federation.codec import encode_update
from jipfed.federation.dispatch import WorkItem, dispatch_step
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.rounds import start_experiment
from jipfed.federation.update import ModelUpdate
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore
from jipfed.tasks.errors import TaskError, TaskFailed
from jipfed.tasks.site_model import upload_update
from jipfed.training.config import TrainConfig

SITE = "site-a"
CONN_ID = "central_test"
TRAIN = TrainConfig(size="tiny", steps=1, batch_size=2, lr=0.01, amp=False, augment=False)


class Central:
    """A served central endpoint over a local folder store."""

    def __init__(self, root: Path) -> None:
        self.store = LocalFolderStore(root)
        self.secret = secrets.token_hex(32)
        self.url, self.stop = serve_in_thread(create_app(lambda: self.store, self.secret))

    def client(self, site: str = SITE) -> CentralClient:
        return CentralClient(self.url, site_token(self.secret, site), timeout_s=30)

    def dispatch(self, name: str, sites: tuple[str, ...] = (SITE, "site-b")) -> ExperimentStore:
        exp_store = ExperimentStore(self.store, name)
        config = ExperimentConfig(name=name, sites=sites, rounds=1, train=TRAIN, round_timeout_s=600.0)
        start_experiment(exp_store, config)
        dispatch_step(exp_store, 0)
        return exp_store


@pytest.fixture
def central(tmp_path: Path) -> Iterator[Central]:
    served = Central(tmp_path / "store")
    try:
        yield served
    finally:
        served.stop()


def set_connection(monkeypatch: pytest.MonkeyPatch, url: str, token: str) -> None:
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps({"conn_type": "http", "host": url, "password": token})
    )


@pytest.fixture
def site(monkeypatch: pytest.MonkeyPatch, central: Central, tmp_path: Path) -> Path:
    """site-a's identity (Variable) and its Connection to the central; returns its data_root."""
    data_root = tmp_path / "site"
    identity = {"site_id": SITE, "data_root": str(data_root), "central_conn_id": CONN_ID}
    monkeypatch.setenv("AIRFLOW_VAR_JIPFED_SITE", json.dumps(identity))
    set_connection(monkeypatch, central.url, site_token(central.secret, SITE))
    return data_root


def trigger(seconds: float = 30.0, poll_interval: float = 0.1) -> CentralWorkTrigger:
    end_at = datetime.now(timezone.utc) + timedelta(seconds=seconds)
    return CentralWorkTrigger(central_conn_id=CONN_ID, end_at=end_at.isoformat(), poll_interval=poll_interval)


def first_event(trig: CentralWorkTrigger) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async for event in trig.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    payload = asyncio.run(asyncio.wait_for(run(), timeout=60))
    json.dumps(payload)  # events must be JSON
    return payload


# -- the long poll of GET /v1/work ---------------------------------------------------------------------


def test_a_work_request_with_wait_s_is_answered_when_a_step_is_dispatched(central: Central) -> None:
    answers: list[list[dict[str, Any]]] = []
    asking = threading.Thread(target=lambda: answers.append(central.client().pending_work_dicts(wait_s=20)))
    asking.start()
    asking.join(timeout=0.5)
    assert asking.is_alive() and answers == []  # nothing dispatched: the central holds the request
    central.dispatch("exp1")
    asking.join(timeout=30)
    assert not asking.is_alive()
    [[item]] = answers
    assert (item["ticket"]["experiment"], item["ticket"]["sites"]) == ("exp1", [SITE])


def test_a_work_request_without_wait_s_is_answered_at_once(central: Central) -> None:
    central.dispatch("other", sites=("site-b",))  # work for another site only
    items, pause = ask_for_work(central.client(), 0.0, poll_interval=30.0)
    # an answer at once (as from a central without the long poll): the poller pauses before the next
    assert items == [] and 0 < pause <= 30.0
    central.dispatch("exp1")
    items, _ = ask_for_work(central.client(), 10.0, poll_interval=30.0)
    assert [i["ticket"]["experiment"] for i in items] == ["exp1"]


# -- CentralWorkTrigger ----------------------------------------------------------------------------


def test_trigger_serializes_to_json_kwargs_and_back() -> None:
    original = trigger(seconds=60, poll_interval=5)
    classpath, kwargs = original.serialize()
    assert classpath == "jipfed.operators.triggers.central_work.CentralWorkTrigger"
    assert json.loads(json.dumps(kwargs)) == kwargs and set(kwargs) == {
        "central_conn_id",
        "end_at",
        "poll_interval",
    }
    module, name = classpath.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name)(**kwargs).serialize() == (classpath, kwargs)
    with pytest.raises(ValueError, match="poll_interval must be > 0"):
        CentralWorkTrigger(CONN_ID, kwargs["end_at"], poll_interval=0)
    with pytest.raises(ValueError):
        CentralWorkTrigger(CONN_ID, "tomorrow")


def test_trigger_waits_for_work_then_fires_with_the_oldest_item(central: Central, site: Path) -> None:
    async def scenario() -> dict[str, Any]:
        waiting = asyncio.ensure_future(first_event_async(trigger()))
        await asyncio.sleep(0.5)
        assert not waiting.done()  # nothing dispatched yet: still polling
        await asyncio.to_thread(central.dispatch, "older")
        await asyncio.to_thread(central.dispatch, "newer")
        return await asyncio.wait_for(waiting, timeout=30)

    event = asyncio.run(scenario())
    assert event["status"] == "work"
    item = WorkItem.from_dict(event["item"])
    assert (item.ticket.experiment, item.ticket.step, item.ticket.sites) == ("older", 0, (SITE,))


async def first_event_async(trig: CentralWorkTrigger) -> dict[str, Any]:
    async for event in trig.run():
        return event.payload
    raise AssertionError("the trigger ended without an event")


def test_trigger_ends_idle_when_no_work_comes(central: Central, site: Path) -> None:
    central.dispatch("other", sites=("site-b",))  # work for another site only
    event = first_event(trigger(seconds=0.5))
    assert event["status"] == "idle" and "no work from the central after" in event["message"]


def test_trigger_polls_through_an_unreachable_central(
    monkeypatch: pytest.MonkeyPatch, site: Path, closed_port: int
) -> None:
    set_connection(monkeypatch, f"http://127.0.0.1:{closed_port}", "jipfed.site-a.x")
    event = first_event(trigger(seconds=0.2))
    assert event["status"] == "idle"


def test_trigger_reports_a_refused_token(
    monkeypatch: pytest.MonkeyPatch, central: Central, site: Path
) -> None:
    set_connection(
        monkeypatch, central.url, site_token(secrets.token_hex(32), SITE)
    )  # another central's token
    event = first_event(trigger())
    assert event["status"] == "error" and "403" in event["message"] and "bad_token" in event["message"]


def test_trigger_reports_a_missing_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", raising=False)
    event = first_event(trigger())
    assert event["status"] == "error" and f"Connection {CONN_ID!r}" in event["message"]


# -- CentralWorkSensor -----------------------------------------------------------------------------


def test_sensor_defers_to_the_trigger_and_accepts_its_work(central: Central, site: Path) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    sensor = CentralWorkSensor(task_id="wait_for_work", timeout=600, poke_interval=7)
    before = datetime.now(timezone.utc)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({"run_id": "scheduled__1"})
    classpath, kwargs = deferred.value.trigger.serialize()
    assert kwargs["central_conn_id"] == CONN_ID and kwargs["poll_interval"] == 7.0
    end_at = datetime.fromisoformat(kwargs["end_at"])
    assert timedelta(seconds=599) < end_at - before < timedelta(seconds=610)
    assert deferred.value.method_name == "execute_complete"

    exp_store = central.dispatch("exp1")
    [item] = central.client().pending_work()
    returned = sensor.execute_complete({"run_id": "scheduled__1"}, {"status": "work", "item": item.to_dict()})
    assert WorkItem.from_dict(returned) == item
    written = json.loads((site / "workflows" / "scheduled__1" / "wait_for_work" / "work.json").read_text())
    assert written == returned and written["ticket"]["config_hash"] == exp_store.config_hash()


def test_sensor_takes_work_dispatched_while_it_waits_in_the_worker(central: Central, site: Path) -> None:
    sensor = CentralWorkSensor(task_id="wait_for_work", timeout=600, worker_wait_s=20)
    context = {"run_id": "scheduled__5"}
    dispatching = threading.Timer(0.5, central.dispatch, args=("exp1",))
    dispatching.start()
    try:
        returned = sensor.execute(context)  # no TaskDeferred: found in the worker
    finally:
        dispatching.join()
    assert returned["ticket"]["experiment"] == "exp1"
    written = json.loads((site / "workflows" / "scheduled__5" / "wait_for_work" / "work.json").read_text())
    assert written == returned


def test_sensor_defers_after_its_worker_wait_without_work(central: Central, site: Path) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    with pytest.raises(ValueError, match="worker_wait_s must be >= 0"):
        CentralWorkSensor(task_id="w", worker_wait_s=-1)
    sensor = CentralWorkSensor(task_id="wait_for_work", timeout=600, worker_wait_s=0.3)
    with pytest.raises(TaskDeferred):
        sensor.execute({"run_id": "scheduled__6"})


def test_sensor_ends_an_idle_run_and_fails_on_refusals(site: Path) -> None:
    context = {"run_id": "scheduled__2"}
    with pytest.raises(AirflowSkipException, match="no work"):
        CentralWorkSensor(task_id="w").execute_complete(context, {"status": "idle", "message": "no work"})
    with pytest.raises(AirflowFailException, match="no work"):
        CentralWorkSensor(task_id="w", soft_fail=False).execute_complete(
            context, {"status": "idle", "message": "no work"}
        )
    with pytest.raises(CentralWorkError, match="polling the central failed: 403"):  # not skipped by soft_fail
        CentralWorkSensor(task_id="w").execute_complete(
            context, {"status": "error", "message": "403 bad_token"}
        )


def test_sensor_pokes_without_deferring(central: Central, site: Path) -> None:
    sensor = CentralWorkSensor(task_id="wait_for_work", deferrable=False)
    context = {"run_id": "scheduled__3"}
    assert sensor.poke(context) is False
    central.dispatch("exp1")
    found = sensor.poke(context)
    assert isinstance(found, PokeReturnValue) and found.is_done
    assert found.xcom_value["ticket"]["experiment"] == "exp1"


def test_work_for_another_site_means_the_token_is_wrong(
    monkeypatch: pytest.MonkeyPatch, central: Central, site: Path
) -> None:
    central.dispatch("exp1", sites=("site-b",))
    set_connection(monkeypatch, central.url, site_token(central.secret, "site-b"))  # site-b's token at site-a
    with pytest.raises(AirflowFailException, match="belongs to another site"):
        CentralWorkSensor(task_id="w", deferrable=False).poke({"run_id": "scheduled__4"})


# -- the push run's work item and the upload ---------------------------------------------------------


def test_find_work_names_what_is_pending(central: Central) -> None:
    central.dispatch("exp1")
    central.dispatch("exp2")
    items = central.client().pending_work()
    assert find_work(items, "exp2", 0, 0, site=SITE).ticket.experiment == "exp2"
    with pytest.raises(AirflowFailException) as missing:
        find_work(items, "exp2", 1, 1, site=SITE)
    assert str(missing.value).startswith(
        "central has no open step 1 (round 1) of experiment 'exp2' for site 'site-a'"
    )
    assert "Pending for this site: exp1 round 0 step 0, exp2 round 0 step 0" in str(missing.value)


def test_upload_refusal_fails_with_the_code_and_reason(central: Central, closed_port: int) -> None:
    exp_store = central.dispatch("exp1")
    [item] = central.client().pending_work()
    where = "site 'site-a', experiment 'exp1', round 0, step 0"
    with pytest.raises(
        TaskFailed, match=rf"^{where}: the central refused the update \(rejected\): "
    ) as refused:
        upload_update(central.client(), item.ticket, b"not a safetensors file", "{}", where=where)
    assert isinstance(refused.value.__cause__, CentralRefused) and exp_store.list_updates(0) == []
    plain = encode_update(  # well-formed, so the client's outgoing check lets it go out
        ModelUpdate.build(
            {"w": torch.ones(1)},
            experiment="exp1",
            round=0,
            site=SITE,
            kind="delta",
            n_samples=1,
            config_hash="0" * 64,
        )
    )
    with pytest.raises(TaskError, match=f"^{where}: upload failed: ") as unreachable:
        upload_update(
            CentralClient(f"http://127.0.0.1:{closed_port}", "t"),
            item.ticket,
            plain.payload,
            plain.manifest.to_json(),
            where=where,
        )
    assert not isinstance(unreachable.value, TaskFailed)  # retryable


# -- a real triggerer (Airflow 3.3 standalone) ---------------------------------------------------------

PROBE_DAG = '''"""Probe: the Airflow DAG's CentralWorkSensor deferred to the real triggerer."""

import datetime as dt

from jipfed.operators.compat import DAG
from jipfed.operators.sensors.central_work import CentralWorkSensor

with DAG("jipfed_pull_probe", schedule=None, start_date=dt.datetime(2024, 1, 1), catchup=False):
    CentralWorkSensor(task_id="wait_for_work", poke_interval=1, timeout=300)
'''


@pytest.mark.slow
def test_the_triggerer_resolves_the_central_connection(central: Central, tmp_path: Path) -> None:
    """The trigger gets only the Connection id; the triggerer reads URL and token from the DB (Airflow 3.3)."""
    from jipfed.testing.airflow import AirflowStandalone

    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "jipfed_pull_probe.py").write_text(PROBE_DAG)
    data_root = tmp_path / "site"
    identity = {"site_id": SITE, "data_root": str(data_root), "central_conn_id": CONN_ID}
    with AirflowStandalone(
        tmp_path / "airflow", dags, env={"AIRFLOW_VAR_JIPFED_SITE": json.dumps(identity)}
    ) as airflow:
        # stored in the metadata DB as a site admin would create it (not an environment variable)
        connection = {"connection_id": CONN_ID, "conn_type": "http", "host": central.url}
        connection["password"] = site_token(central.secret, SITE)
        airflow.client.request("POST", "/api/v2/connections", json=connection, expect=(201,))
        airflow.wait_for_dag("jipfed_pull_probe")
        airflow.client.unpause("jipfed_pull_probe")
        run_id = airflow.client.trigger_dag_run("jipfed_pull_probe")["dag_run_id"]
        deadline = time.monotonic() + 60
        while airflow.client.list_task_instances("jipfed_pull_probe", run_id)[0]["state"] != "deferred":
            assert time.monotonic() < deadline, airflow.log_tail()
            time.sleep(0.5)
        central.dispatch("exp1")  # only now is there work: the trigger has been polling
        run = airflow.client.wait_for_dag_run("jipfed_pull_probe", run_id, timeout_s=120, poll_s=0.5)
        assert run["state"] == "success", airflow.failed_task_logs("jipfed_pull_probe", run_id)
    work = json.loads((data_root / "workflows" / run_id / "wait_for_work" / "work.json").read_text())
    assert (work["ticket"]["experiment"], work["ticket"]["step"]) == ("exp1", 0)
