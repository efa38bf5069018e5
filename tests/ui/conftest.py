"""Fixtures for the page tests: a store with real experiments (one running, two finished) and one
``airflow standalone`` (Airflow 3) serving it, shared by the plugin and browser tests."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from training.synth import site_trainers

from jipfed.central.ui_pages import write_report
from jipfed.storage.local import LocalFolderStore
from jipfed.testing.airflow import AirflowStandalone

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


@dataclass
class Airflow:
    """The running Airflow 3 with the plugin, its site token secret, and the store it serves."""

    standalone: AirflowStandalone
    secret: str
    store: LocalFolderStore


@pytest.fixture(scope="session")
def airflow(ui_store: LocalFolderStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Airflow]:
    """One `airflow standalone` for the plugin and browser tests; its model store is ``ui_store``."""
    root = tmp_path_factory.mktemp("airflow")
    (root / "dags").mkdir()
    secret = secrets.token_hex(32)
    env = {
        "AIRFLOW__JIPFED__SITE_TOKEN_SECRET": secret,
        "AIRFLOW_CONN_JIPFED_MODEL_STORE_DEFAULT": json.dumps(
            {"conn_type": "fs", "extra": {"path": str(ui_store.root)}}
        ),
    }
    with AirflowStandalone(home=root / "home", dags_folder=root / "dags", env=env) as standalone:
        yield Airflow(standalone, secret, ui_store)
