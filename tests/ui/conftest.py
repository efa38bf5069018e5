"""Fixtures for the page tests: a store with real experiments (one running, two finished)."""

from __future__ import annotations

import pytest
from training.synth import site_trainers

from jipfed.central.ui_pages import write_report
from jipfed.storage.local import LocalFolderStore

from .experiments import SITES, TRAIN, run_experiment, score_final_model


@pytest.fixture(scope="session")
def ui_store(tmp_path_factory: pytest.TempPathFactory) -> LocalFolderStore:
    """``running`` (2 of 3 rounds closed, site-c failed round 1), ``fedavg`` and ``fedprox`` finished;
    ``fedavg``'s final model scored on every site and its report stored with it."""
    root = tmp_path_factory.mktemp("ui-store")
    trainers = site_trainers(root / "sites", SITES, TRAIN)
    store = LocalFolderStore(root / "store")
    run_experiment(store, trainers, "running", rounds=3, closed=2, failing={1: "site-c"})
    fedavg = run_experiment(store, trainers, "fedavg", rounds=2)
    score_final_model(fedavg, trainers)
    write_report(fedavg)
    run_experiment(store, trainers, "fedprox", rounds=2, strategy="fedprox", strategy_kwargs={"mu": 0.1})
    store.put_bytes("experiments/broken/state.json", b"{}")
    return store
