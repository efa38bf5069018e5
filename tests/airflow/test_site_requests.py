"""The real site DAG answers the central's federated evaluation request (``jipfed_site_requests``).

Only real components, as in test_site_dag.py (whose fixtures this file reuses): Orthanc holding
synthetic DICOM cases, the central endpoint (uvicorn) over moto's S3 server, and ``dag.test()`` of
dags/jipfed_site.py in Airflow 3.3's venv. The central asks the site to score a model; the DAG's
sensor sees the open request, its answer task prepares the site's data from the PACS and answers
through the endpoint; the central's summary holds the site's numbers (and nothing identifying
was sent).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from safetensors.torch import load as load_tensors

from jipfed.federation.evaluation import (
    FINAL,
    collect_final_evaluations,
    evaluation_prefix,
    request_evaluation,
    summarise,
)
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.rounds import start_experiment
from jipfed.federation.site_requests import load_request, pending_requests
from jipfed.storage.state import ExperimentStore
from jipfed.testing.airflow import run_dag_test
from jipfed.testing.orthanc import OrthancServer
from tests.airflow import test_site_dag as site_dag
from tests.airflow.test_site_dag import (
    N_CASES,
    PYTHONS,
    SITE,
    TRAIN,
    Central,
    assert_nothing_identifying_was_sent,
    dags_of,
    load_dag_module,
    require,
    site_env,
)

# the site DAG tests' fixtures: the same S3 and central endpoint, Orthanc, DAGs folder, Airflow home
s3, central, synth_dicom, pacs = site_dag.s3, site_dag.central, site_dag.synth_dicom, site_dag.pacs
dags_folder, airflow_homes = site_dag.dags_folder, site_dag.airflow_homes


def test_each_site_identity_has_a_requests_dag(monkeypatch: pytest.MonkeyPatch) -> None:
    dags = dags_of(load_dag_module(monkeypatch, "site-a,site-b"))
    for site in ("site-a", "site-b"):
        dag = dags[f"jipfed_site_requests__{site}"]
        assert str(dag.schedule) == "@continuous" and dag.max_active_runs == 1 and dag.is_paused_upon_creation
        wait, answer = dag.get_task("wait_for_requests"), dag.get_task("answer_requests")
        assert wait.downstream_task_ids == {"answer_requests"} and not answer.downstream_task_ids
        assert wait.mode == "reschedule" and wait.soft_fail and wait.timeout == 3600
        assert {(t.site_variable, t.hosted_site) for t in dag.tasks} == {(f"jipfed_site__{site}", site)}
        assert answer.work_task_id is None  # a request is not a training step: no work item


@pytest.mark.slow
def test_the_site_dag_answers_an_evaluation_request(
    central: Central,
    pacs: OrthancServer,
    dags_folder: Path,
    airflow_homes: dict[str, Path],
    tmp_path: Path,
    synth_dicom: Path,
) -> None:
    python, home = require(PYTHONS["airflow3"]), airflow_homes["airflow3"]
    exp_store = ExperimentStore(central.store, "scored")
    config = ExperimentConfig(name="scored", sites=(SITE,), rounds=1, train=TRAIN, round_timeout_s=600.0)
    start_experiment(exp_store, config)
    payload, _ = exp_store.load_global(0)
    request = request_evaluation(
        exp_store, FINAL, {FINAL: load_tensors(payload)}, sites=[SITE], timeout_s=600
    )
    assert [r.id for r in pending_requests(central.store, SITE, "evaluate")] == ["scored.final"]
    assert summarise(central.store, request) is None  # the site has not answered yet

    data_root = tmp_path / "site"
    result = run_dag_test(
        python, dags_folder, "jipfed_site_requests", home=home, env=site_env(central, pacs, data_root)
    )

    assert result["state"] == "success", result
    assert result["tasks"] == {"wait_for_requests[-1]": "success", "answer_requests[-1]": "success"}
    assert pending_requests(central.store, SITE, "evaluate") == []
    assert collect_final_evaluations(central.store) == ["scored"]
    summary = central.store.get_json(f"{evaluation_prefix(exp_store, FINAL)}/summary.json")
    answer = summary["sites"][SITE]
    assert summary["failed"] == {} and 1 <= answer["n_cases"] < N_CASES
    scores = answer["metrics"][FINAL]
    assert "dice_mean" in scores and 0.0 <= scores["dice_mean"] <= 1.0
    assert all(math.isfinite(v) for v in scores.values())
    assert summary["weighted"][FINAL] == pytest.approx(scores)
    assert load_request(central.store, request.prefix).id == "scored.final"
    assert_nothing_identifying_was_sent(central, synth_dicom, str(data_root))
