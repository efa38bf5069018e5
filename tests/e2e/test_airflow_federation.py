"""End to end in a real Airflow: 3 sites with their own Orthanc, the central DAG triggered over REST.

One ``airflow standalone`` (scheduler, triggerer, DAG processor, API server on 127.0.0.1) hosts the
central DAG, the plugin endpoint and the three sites' DAGs (``JIPFED_HOSTED_SITES``); every site
fetches from its own Orthanc and talks to the central only over HTTP with its own token, as a
remote hospital would (:mod:`jipfed.localfed`). Nothing is mocked.

The model store Connection is in Airflow's database (written through the REST API), not in the
environment: the collect trigger in Airflow 3's triggerer can only read it through the API server.

One federation serves every test of ``tests/e2e`` (``conftest.py``); each test runs its own
experiment and needs nothing from another test (any order, any subset). Waits end on the store's
state, the runs' states or the sites' folders, never on a fixed sleep; no test needs a step to
finish within a time limit.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_tensors

from jipfed.central.client import CentralClient, CentralRefused
from jipfed.central.tokens import site_token
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.rounds import StepTicket
from jipfed.federation.site_round import run_site_step
from jipfed.localfed import CENTRAL_DAG, LocalFederation, LocalSite
from jipfed.storage.state import ExperimentStore, Status
from jipfed.training.data import SiteData
from jipfed.training.local import LocalTrainer
from tests.airflow.secure_helpers import assert_only_masked_updates, assert_secure_round
from tests.training.synth import write_site

pytestmark = pytest.mark.slow

#: Small and quick: a tiny U-Net, two local epochs per round.
BASE = {
    "model_size": "tiny",
    "local_epochs": 2,
    "learning_rate": 0.003,
    "batch_size": 2,
    "round_timeout_s": 600,
}


def run_experiment(fed: LocalFederation, name: str, timeout_s: float = 900, **params: Any) -> ExperimentStore:
    fed.trigger({**BASE, "experiment": name, **params})
    status = fed.wait(name, timeout_s)
    assert status is Status.FINISHED, f"{name} ended {status}"
    return fed.experiment_store(name)


def run_folders(site: LocalSite) -> list[str]:
    workflows = site.data_root / "workflows"
    return sorted(p.name for p in workflows.iterdir()) if workflows.exists() else []


def assert_run_folders_removed(fed: LocalFederation, timeout_s: float = 300) -> None:
    """Every site's runs delete their run folder (the cleanup teardown ends a site's run after the
    upload the central waits for, so this waits for the folders to go); the caches stay."""
    deadline = time.monotonic() + timeout_s
    while any(run_folders(site) for site in fed.sites) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert {site.site_id: run_folders(site) for site in fed.sites} == {site.site_id: [] for site in fed.sites}
    for site in fed.sites:
        assert any((site.data_root / "dicom").iterdir()), site.site_id


def global_sha(exp_store: ExperimentStore, round_: int) -> str:
    return hashlib.sha256(exp_store.store.get_bytes(exp_store.layout.global_model(round_))).hexdigest()


def prepared_data(site: LocalSite) -> SiteData:
    """The site's preprocessed cases (read here to score models; they never leave the site in the DAGs)."""
    (index,) = (site.data_root / "preprocessed").glob("*/index.json")
    return SiteData.from_dir(index.parent, group=site.site_id)


def site_dice(fed: LocalFederation, exp_store: ExperimentStore, round_: int) -> float:
    """Mean Dice of round ``round_``'s global model on every site's held-out cases (evaluated here)."""
    config = ExperimentConfig.from_dict(exp_store.load_config())
    weights = load_tensors(exp_store.store.get_bytes(exp_store.layout.global_model(round_)))
    scores = []
    for site in fed.sites:
        trainer = LocalTrainer(config.train, prepared_data(site), device="cpu")
        scores.append(trainer.evaluate(weights)["dice_mean"])
    return sum(scores) / len(scores)


def check_rounds(exp_store: ExperimentStore, rounds: int, sites: list[str]) -> None:
    shas = [global_sha(exp_store, r) for r in range(rounds + 1)]
    assert len(set(shas)) == rounds + 1, "the global model must change every round"
    for r in range(rounds):
        record = exp_store.load_aggregate(r)
        assert record["included"] == sites, record
    state = exp_store.load_state()
    assert [rec.step for rec in state.history] == list(range(rounds))


def central_runs_by_state(fed: LocalFederation, experiment: str) -> dict[str, list[str]]:
    """``state -> run ids`` of the experiment's central DAG runs."""
    runs: dict[str, list[str]] = {}
    for run in fed.central_runs(experiment):
        runs.setdefault(run["state"], []).append(run["dag_run_id"])
    return runs


def deferred_task_logs(fed: LocalFederation, dag_id: str, run_id: str) -> list[str]:
    """The logs of a run's task instances that waited in the triggerer (task ids do not matter)."""
    logs = []
    for ti in fed.client.list_task_instances(dag_id, run_id):
        log = fed.client.get_task_log(
            dag_id, run_id, ti["task_id"], ti["try_number"], map_index=ti["map_index"]
        )
        if "DEFERRED" in log:
            logs.append(log)
    return logs


def test_push_experiment_completes(fed: LocalFederation) -> None:
    """Push: the central creates each site's run over REST (Connection ``jipfed_site_<site>``), one
    central run per step, and waits for the updates in the triggerer with the store Connection it
    reads from Airflow's database; the model learns."""
    torch.set_num_threads(1)
    name, rounds = "e2e-push", 2
    fed.enable_sites("push")
    exp_store = run_experiment(fed, name, rounds=rounds, transport="push", local_epochs=5, learning_rate=0.01)
    check_rounds(exp_store, rounds, [s.site_id for s in fed.sites])
    before, after = site_dice(fed, exp_store, 0), site_dice(fed, exp_store, rounds)
    assert after > max(0.03, 3 * before), (before, after)
    runs = central_runs_by_state(fed, name)
    assert list(runs) == ["success"] and len(runs["success"]) == rounds, runs
    for site in fed.sites:  # one site run per step, created by the central's push with the step's conf
        confs = [(r.get("conf") or {}) for r in fed.dag_runs(site.site_dag)]
        steps = sorted(c["step"] for c in confs if c.get("experiment") == name)
        assert steps == list(range(rounds)), (site.site_id, confs)
    # the waits that deferred saw the deliveries in the triggerer (a store error there fails the run)
    waits = [log for run_id in runs["success"] for log in deferred_task_logs(fed, CENTRAL_DAG, run_id)]
    assert waits, "no central task waited in the triggerer"
    delivered = [log for log in waits if ": delivered" in log]
    assert delivered, waits[0][-3000:]
    assert_run_folders_removed(fed)


def test_push_transport_runs_secure_aggregation(fed: LocalFederation) -> None:
    """Secure aggregation from the form with ``transport=push``: the central triggers every site's
    DAG for the step; each site run fetches, trains and runs the secure upload task (key, the peers'
    keys, mask, upload). The central aggregates from masked vectors only (the round record names the
    complete attempt) and the model changes. The pull transport and a drop-out are tested in
    ``tests/airflow/test_secure_aggregation.py``; the arithmetic there and in ``tests/privacy``."""
    name = "secagg-push"
    fed.enable_sites("push")
    params = {"rounds": 1, "transport": "push", "secure_aggregation": True, "local_epochs": 1}
    # secure aggregation hides each update's norm: no norm bound
    exp_store = run_experiment(fed, name, norm_bound_factor=None, **params)
    sites = [site.site_id for site in fed.sites]
    for site in fed.sites:  # the central's push reached every site: one successful site run, step 0
        confs = [(r.get("conf") or {}) for r in fed.dag_runs(site.site_dag) if r["state"] == "success"]
        assert [c["step"] for c in confs if c.get("experiment") == name] == [0], (site.site_id, confs)
    assert exp_store.load_config()["privacy"]["secure_aggregation"]["key_timeout_s"] > 0
    record = assert_secure_round(exp_store, 0, sites)
    assert record["secure_aggregation"]["total_weight"] > 0
    assert_only_masked_updates(exp_store, 0, masked=len(sites))
    assert global_sha(exp_store, 0) != global_sha(exp_store, 1)


def test_a_site_whose_pacs_is_down_is_left_out_with_the_reason(fed: LocalFederation) -> None:
    down = fed.sites[-1]
    fed.enable_sites("pull")
    down.pacs.stop()
    try:
        exp_store = run_experiment(fed, "e2e-pacs-down", rounds=1, transport="pull", min_sites=2)
    finally:
        down.pacs.start()
    record = exp_store.load_aggregate(0)
    assert record["included"] == [s.site_id for s in fed.sites[:-1]]
    assert record["missing"] == [down.site_id]
    reason = record["missing_reasons"][down.site_id]
    assert "PACS" in reason or "pacs" in reason, reason


def wait_for_failed_run(fed: LocalFederation, experiment: str, timeout_s: float) -> list[str]:
    """Wait until one of the experiment's central runs failed; returns the failed run ids."""
    deadline = time.monotonic() + timeout_s
    while not (failed := central_runs_by_state(fed, experiment).get("failed")):
        assert time.monotonic() < deadline, f"no failed run of {experiment} after {timeout_s:.0f} s"
        time.sleep(1.0)
    return failed


def test_an_update_after_the_round_timeout_is_refused(fed: LocalFederation, tmp_path: Path) -> None:
    """``site-late`` (no DAG answers for it) is the only site: its round times out, the step fails
    for lack of a quorum with the state untouched, and its update, sent after that over HTTP, is
    refused as late. Nothing has to happen before the deadline, so a short timeout is safe."""
    name, late = "e2e-late", "site-late"
    fed.enable_sites("pull")
    fed.trigger(
        {
            **BASE,
            "experiment": name,
            "rounds": 1,
            "transport": "pull",
            "sites": [late],
            "min_sites": 1,
            "local_epochs": 1,
            "round_timeout_s": 15,
        }
    )
    wait_for_failed_run(fed, name, timeout_s=600)
    exp_store = fed.experiment_store(name)
    failure = exp_store.site_failures(0)[late]
    assert failure["source"] == "central" and "timed out" in failure["reason"], failure
    state = exp_store.load_state()
    assert state.status is Status.RUNNING and state.next_step == 0 and state.history == (), state
    assert not exp_store.has_global(1)
    # site-late trains on round 0's model (synthetic cases of its own) and uploads: refused as late.
    ticket = StepTicket.from_dict(exp_store.load_dispatch(0, 0)["ticket"])
    config = ExperimentConfig.from_dict(exp_store.load_config())
    data = SiteData.from_dir(write_site(tmp_path / late, 2, size=16), group=late)
    trainer = LocalTrainer(config.train, data, device="cpu")
    payload, manifest = exp_store.load_global(0)
    encoded = run_site_step(
        ticket, payload, manifest, trainer, late, name, exp_store.config_hash(), evaluate=False
    )
    client = CentralClient(f"{fed.airflow.base_url}/jipfed", site_token(fed.token_secret, late))
    with pytest.raises(CentralRefused) as refused:
        client.put_update(name, 0, encoded.payload, encoded.manifest.to_json())
    assert refused.value.code == "late", refused.value
    assert exp_store.list_updates(0) == []
    assert client.pending_work() == []


def test_pull_experiment_survives_a_crash_and_restart_without_losing_or_repeating_a_round(
    fed: LocalFederation,
) -> None:
    """Pull, with every Airflow process killed (SIGKILL) while round 1 is dispatched or under way."""
    name = "e2e-crash"
    fed.enable_sites("pull")
    fed.trigger({**BASE, "experiment": name, "rounds": 2, "transport": "pull"})
    exp_store = fed.experiment_store(name)
    fed.wait_for_step(name, 0, timeout_s=600)
    fed.crash_and_restart_airflow()
    assert fed.wait(name, 900) is Status.FINISHED
    check_rounds(exp_store, 2, [s.site_id for s in fed.sites])
    assert_run_folders_removed(fed)  # the retried runs of the crashed ones clean up too
