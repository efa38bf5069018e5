"""The central's push of a step to the sites (operators/central/dispatch.py): one site never stops the others."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from jipfed.operators.central.dispatch import push_step, site_run_id

from jipfed.federation.dispatch import FAILED, dispatch_step, site_status
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.rounds import start_experiment
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore
from jipfed.training.config import TrainConfig

SITES = ("site-a", "site-b", "site-c")


def started(root: Path, transport: str) -> ExperimentStore:
    exp_store = ExperimentStore(LocalFolderStore(root), "exp-push")
    config = ExperimentConfig(
        name="exp-push", sites=SITES, rounds=1, train=TrainConfig(size="tiny", steps=1), transport=transport
    )
    start_experiment(exp_store, config)
    return exp_store


def test_every_unreachable_site_gets_its_failure_recorded_and_the_others_are_still_tried(
    tmp_path: Path, closed_port: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # site-a and site-c: a closed port (no answer: tried again, then recorded); site-b: no Connection
    for site in ("site-a", "site-c"):
        conn = {"conn_type": "http", "host": "127.0.0.1", "port": closed_port, "login": "u", "password": "p"}
        monkeypatch.setenv(f"AIRFLOW_CONN_JIPFED_SITE_{site.upper()}", json.dumps(conn))
    exp_store = started(tmp_path, "push")
    dispatch = dispatch_step(exp_store, 0)
    with caplog.at_level(logging.INFO, logger="jipfed.operators.central.dispatch"):
        outcomes = push_step(exp_store, dispatch, passes=2, retry_delay_s=0)
    assert sorted(outcomes) == list(SITES)
    for site in SITES:
        status, reason = site_status(exp_store, dispatch, site)
        assert status == FAILED and f"jipfed_site_{site}" in reason, (site, reason)
        assert outcomes[site].startswith("not reached") and reason in outcomes[site]
    assert "isn't defined" in site_status(exp_store, dispatch, "site-b")[1]
    retried = [r.getMessage() for r in caplog.records if "try 1 of 2" in r.getMessage()]
    assert len(retried) == 2 and all("site-b" not in m for m in retried), retried  # only the transient ones
    assert site_run_id("exp-push", 0, dispatch.attempt) == "jipfed__exp-push__s0__a0"


def test_pull_transport_sends_nothing(tmp_path: Path) -> None:
    exp_store = started(tmp_path, "pull")
    dispatch = dispatch_step(exp_store, 0)
    outcomes = push_step(exp_store, dispatch)
    assert sorted(outcomes) == list(SITES) and all("pull" in o for o in outcomes.values())
    assert exp_store.site_failures(0) == {}
