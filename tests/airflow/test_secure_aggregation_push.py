"""Secure aggregation with the push transport, end to end in a real Airflow 3.3.

:class:`jipfed.localfed.LocalFederation`: ``airflow standalone`` hosts the central DAG, the plugin
endpoint and three sites' DAGs, each site with its own Orthanc. The experiment is started from the
form with secure aggregation switched on and ``transport=push``: the central triggers every site's
DAG over the REST API (Connection ``jipfed_site_<site>``) for each step; each site run fetches its
cases, trains and runs the secure upload task (key, the peers' keys, mask, upload). The central
must aggregate every round from masked vectors only (the round record names the complete attempt)
and the model must change each round. The pull transport and a drop-out are tested in
``test_secure_aggregation.py``; the arithmetic (unmasked sum = plain weighted sum) there and in
``tests/privacy``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from jipfed.localfed import LocalFederation
from jipfed.storage.state import Status
from tests.airflow.secure_helpers import assert_only_masked_updates, assert_secure_round

pytestmark = pytest.mark.slow

NAME, ROUNDS = "secagg-push", 1
PARAMS = {
    "experiment": NAME,
    "rounds": ROUNDS,
    "transport": "push",
    "secure_aggregation": True,
    "norm_bound_factor": None,  # secure aggregation hides each update's norm
    "model_size": "tiny",
    "local_epochs": 1,
    "learning_rate": 0.003,
    "batch_size": 2,
    "round_timeout_s": 600,
}


def test_push_transport_runs_secure_aggregation_every_round(tmp_path: Path) -> None:
    with LocalFederation(
        tmp_path / "fed", n_sites=3, cases_per_site=3, shape=(48, 48, 32), progress=False
    ) as fed:
        fed.enable_sites("push")
        fed.trigger(PARAMS)
        assert fed.wait(NAME, 900) is Status.FINISHED
        site_runs = {
            site.site_id: sorted(
                (r.get("conf") or {}).get("step")
                for r in fed.dag_runs(site.site_dag)
                if r["state"] == "success"
            )
            for site in fed.sites
        }
    sites = [site.site_id for site in fed.sites]
    # every step reached every site by the central's push (one site DAG run per step, with its conf)
    assert site_runs == {site: list(range(ROUNDS)) for site in sites}
    exp_store = fed.experiment_store(NAME)
    assert exp_store.load_config()["privacy"]["secure_aggregation"]["key_timeout_s"] > 0
    shas = set()
    for round_ in range(ROUNDS):
        record = assert_secure_round(exp_store, round_, sites)
        assert record["secure_aggregation"]["total_weight"] > 0
        assert_only_masked_updates(exp_store, round_, masked=len(sites))
        shas.add(
            hashlib.sha256(exp_store.store.get_bytes(exp_store.layout.global_model(round_ + 1))).digest()
        )
    assert len(shas) == ROUNDS  # the global model changed every round
