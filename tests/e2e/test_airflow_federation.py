"""End to end in a real Airflow: 3 sites with their own Orthanc, the central DAG triggered over REST.

One ``airflow standalone`` (scheduler, triggerer, DAG processor, API server on 127.0.0.1) hosts the
central DAG, the plugin endpoint and the three sites' DAGs (``JIPFED_HOSTED_SITES``); every site
fetches from its own Orthanc and talks to the central only over HTTP with its own token, as a
remote hospital would (:mod:`jipfed.localfed`). Nothing is mocked.

One federation serves the module; each test runs its own experiment and needs nothing from
another test (any order, any subset). Waits end on the store's state or the sites' folders, never
on a fixed sleep.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_tensors

from jipfed.central.client import CentralClient, CentralRefused
from jipfed.central.tokens import site_token
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.rounds import StepTicket
from jipfed.federation.site_round import run_site_step
from jipfed.localfed import LocalFederation, LocalSite
from jipfed.storage.state import ExperimentStore, Status
from jipfed.training.data import SiteData
from jipfed.training.local import LocalTrainer

pytestmark = pytest.mark.slow

#: Small and quick: a tiny U-Net, two local epochs per round.
BASE = {
    "model_size": "tiny",
    "local_epochs": 2,
    "learning_rate": 0.003,
    "batch_size": 2,
    "round_timeout_s": 600,
}


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory):
    federation = LocalFederation(
        tmp_path_factory.mktemp("fed"), n_sites=3, cases_per_site=4, shape=(48, 48, 32), progress=False
    )
    with federation:
        yield federation


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


def test_push_experiment_completes(fed: LocalFederation) -> None:
    torch.set_num_threads(1)
    fed.enable_sites("push")
    exp_store = run_experiment(
        fed, "e2e-push", rounds=4, transport="push", local_epochs=3, learning_rate=0.01
    )
    check_rounds(exp_store, 4, [s.site_id for s in fed.sites])
    before, after = site_dice(fed, exp_store, 0), site_dice(fed, exp_store, 4)
    assert after > max(0.03, 3 * before), (before, after)
    assert_run_folders_removed(fed)


def test_pull_experiment_completes(fed: LocalFederation) -> None:
    fed.enable_sites("pull")
    exp_store = run_experiment(fed, "e2e-pull", rounds=2, transport="pull")
    check_rounds(exp_store, 2, [s.site_id for s in fed.sites])
    assert_run_folders_removed(fed)


def test_a_site_whose_pacs_is_down_is_left_out_with_the_reason(fed: LocalFederation) -> None:
    down = fed.sites[-1]
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


def test_an_update_after_the_round_timeout_is_refused(fed: LocalFederation) -> None:
    """A second site, ``site-late``, joins the experiment but answers only after the timeout.

    Only site-a answers in time: one site's (mostly cached) data preparation and one local epoch,
    well inside the 120 s round timeout even on a loaded machine.
    """
    name, late = "e2e-late", "site-late"
    fed.enable_sites("pull")
    hosted = [fed.sites[0].site_id]
    exp_store = run_experiment(
        fed,
        name,
        rounds=1,
        transport="pull",
        sites=[*hosted, late],
        min_sites=1,
        local_epochs=1,
        round_timeout_s=120,
    )
    record = exp_store.load_aggregate(0)
    assert record["included"] == hosted and record["missing"] == [late]
    assert "timed out" in record["missing_reasons"][late]
    # site-late trains on round 0's model (with site-a's data; it has none) and uploads: refused as late.
    ticket = StepTicket.from_dict(exp_store.load_dispatch(0, 0)["ticket"])
    config = ExperimentConfig.from_dict(exp_store.load_config())
    trainer = LocalTrainer(config.train, prepared_data(fed.sites[0]), device="cpu")
    payload, manifest = exp_store.load_global(0)
    encoded = run_site_step(
        ticket, payload, manifest, trainer, late, name, exp_store.config_hash(), evaluate=False
    )
    client = CentralClient(f"{fed.airflow.base_url}/jipfed", site_token(fed.token_secret, late))
    with pytest.raises(CentralRefused) as refused:
        client.put_update(name, 0, encoded.payload, encoded.manifest.to_json())
    assert refused.value.code == "late", refused.value
    assert exp_store.list_updates(0) == hosted
    assert client.pending_work() == []


def test_crash_and_restart_resumes_without_losing_or_repeating_a_round(fed: LocalFederation) -> None:
    name = "e2e-crash"
    fed.enable_sites("pull")
    fed.trigger({**BASE, "experiment": name, "rounds": 2, "transport": "pull"})
    exp_store = fed.experiment_store(name)
    fed.wait_for_step(name, 0, timeout_s=600)  # round 1 is dispatched or under way when Airflow dies
    fed.crash_and_restart_airflow()
    assert fed.wait(name, 900) is Status.FINISHED
    check_rounds(exp_store, 2, [s.site_id for s in fed.sites])
    assert_run_folders_removed(fed)  # the retried runs of the crashed ones clean up too
