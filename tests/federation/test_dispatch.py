"""Dispatch records, deadlines, site failure reports and the per-site work list."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from training.synth import site_trainers

from jipfed.federation.dispatch import (
    DELIVERED,
    FAILED,
    TIMED_OUT,
    WAITING,
    WorkItem,
    accept_in_time,
    dispatch_step,
    model_for_site,
    open_experiments,
    pending_work,
    record_timeout,
    report_site_failure,
    site_status,
    utcnow,
)
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.rounds import (
    ProtocolError,
    QuorumNotMet,
    UpdateRefused,
    aggregate_step,
    fail_experiment,
    start_experiment,
)
from jipfed.federation.site_round import run_site_step
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore
from jipfed.training.config import TrainConfig
from jipfed.training.local import LocalTrainer

SITES = ("site-a", "site-b", "site-c")
TRAIN = TrainConfig(size="tiny", steps=1, batch_size=2, lr=0.01, amp=False, augment=False)


@pytest.fixture(scope="module")
def trainers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LocalTrainer]:
    return site_trainers(tmp_path_factory.mktemp("sites"), SITES, TRAIN)


def started(tmp_path: Path, name: str = "exp1", **overrides) -> ExperimentStore:
    values = {
        "name": name,
        "sites": SITES,
        "rounds": 2,
        "train": TRAIN,
        "round_timeout_s": 60.0,
        "min_sites": 2,
    }
    values.update(overrides)
    exp_store = ExperimentStore(LocalFolderStore(tmp_path / "store"), name)
    start_experiment(exp_store, ExperimentConfig(**values))
    return exp_store


def trained(exp_store: ExperimentStore, site: str, trainer: LocalTrainer, round_: int, step: int):
    payload, manifest = model_for_site(exp_store, site, round_, step)
    ticket = [w for w in pending_work(exp_store.store, site) if w.ticket.step == step][0].ticket
    return run_site_step(
        ticket,
        payload,
        manifest,
        trainer,
        site,
        exp_store.experiment,
        exp_store.config_hash(),
        evaluate=False,
    )


def test_dispatch_is_idempotent_until_the_deadline_then_a_new_attempt(tmp_path: Path) -> None:
    exp_store = started(tmp_path)
    now = utcnow().replace(microsecond=0)
    first = dispatch_step(exp_store, 0, now=now)
    assert first.attempt == 0 and first.deadline == now + timedelta(seconds=60)
    assert dispatch_step(exp_store, 0, now=now + timedelta(seconds=30)) == first
    again = dispatch_step(exp_store, 0, now=now + timedelta(seconds=61))
    assert again.attempt == 1 and again.deadline > first.deadline


def test_work_lists_only_the_sites_open_steps_across_experiments(tmp_path: Path) -> None:
    one = started(tmp_path, "exp1")
    two = started(tmp_path, "exp2", sites=("site-a", "site-b"))
    assert pending_work(one.store, "site-a") == []  # nothing dispatched yet
    dispatch_step(one, 0)
    dispatch_step(two, 0)
    work = pending_work(one.store, "site-a")
    assert [w.ticket.experiment for w in work] == ["exp1", "exp2"]
    assert [w.ticket.experiment for w in pending_work(one.store, "site-c")] == ["exp1"]
    item = WorkItem.from_dict(work[0].to_dict())
    assert item.ticket == work[0].ticket and item.config["name"] == "exp1"
    with pytest.raises(ProtocolError, match="site-c.*not selected"):
        model_for_site(two, "site-c", 0, 0)


def test_failure_report_removes_the_work_and_is_recorded_in_aggregate_json(
    tmp_path: Path, trainers: dict[str, LocalTrainer]
) -> None:
    exp_store = started(tmp_path)
    dispatch = dispatch_step(exp_store, 0)
    for site in ("site-a", "site-b"):
        encoded = trained(exp_store, site, trainers[site], 0, 0)
        accept_in_time(exp_store, site, 0, encoded.payload, encoded.manifest.to_json())
    report_site_failure(exp_store, "site-c", 0, 0, "fetch_dicom failed: PACS unreachable")
    report_site_failure(exp_store, "site-c", 0, 0, "a second report does not replace the first")
    assert pending_work(exp_store.store, "site-c") == []
    assert site_status(exp_store, dispatch, "site-a")[0] == DELIVERED
    assert site_status(exp_store, dispatch, "site-c") == (FAILED, "fetch_dicom failed: PACS unreachable")
    aggregate_step(exp_store, 0)
    record = exp_store.load_aggregate(0)
    assert record["included"] == ["site-a", "site-b"]
    assert record["missing_reasons"] == {"site-c": "fetch_dicom failed: PACS unreachable"}


def test_update_after_the_deadline_is_refused_and_the_timeout_recorded(
    tmp_path: Path, trainers: dict[str, LocalTrainer]
) -> None:
    exp_store = started(tmp_path)
    now = utcnow()
    dispatch = dispatch_step(exp_store, 0, now=now)
    encoded = trained(exp_store, "site-a", trainers["site-a"], 0, 0)
    late = now + timedelta(seconds=61)
    assert site_status(exp_store, dispatch, "site-a", now)[0] == WAITING
    assert site_status(exp_store, dispatch, "site-a", late)[0] == TIMED_OUT
    with pytest.raises(UpdateRefused) as refused:
        accept_in_time(exp_store, "site-a", 0, encoded.payload, encoded.manifest.to_json(), now=late)
    assert refused.value.code == "late" and "timed out" in str(refused.value)
    assert exp_store.list_updates(0) == []
    for site in SITES:
        record_timeout(exp_store, dispatch, site)
    with pytest.raises(QuorumNotMet, match="timed out"):
        aggregate_step(exp_store, 0)
    assert not exp_store.has_global(1)


def test_work_shows_a_site_only_itself_and_polls_only_open_experiments(tmp_path: Path) -> None:
    one = started(tmp_path, "exp1", datasets={"site-a": "BRATS-A", "site-b": "BRATS-B"})
    dispatch_step(one, 0)
    [item] = pending_work(one.store, "site-a")
    assert item.ticket.sites == ("site-a",) and list(item.ticket.local_work) == ["site-a"]
    assert item.config["sites"] == ["site-a"] and item.config["datasets"] == {"site-a": "BRATS-A"}
    assert "site-b" not in json.dumps(item.to_dict()) and "BRATS-B" not in json.dumps(item.to_dict())
    assert (
        ExperimentConfig.from_dict(item.config).train == ExperimentConfig.from_dict(one.load_config()).train
    )
    assert open_experiments(one.store) == ["exp1"]
    fail_experiment(one, "stopped by the admin")
    assert pending_work(one.store, "site-a") == [] and open_experiments(one.store) == []

    class CountingStore(LocalFolderStore):
        reads = 0

        def get_bytes(self, key: str) -> bytes:
            CountingStore.reads += 1
            return super().get_bytes(key)

    store = CountingStore(one.store.root)
    pending_work(store, "site-a")
    assert CountingStore.reads == 0  # a finished or failed experiment is not read at all
