"""The final model's scores while sites are still answering: shown read-only, nothing written."""

from __future__ import annotations

from pathlib import Path

import torch

from jipfed.central.ui_data import final_evaluation
from jipfed.central.ui_html import _scores
from jipfed.federation import site_requests
from jipfed.federation.evaluation import request_evaluation, summarise
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.rounds import start_experiment
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore
from jipfed.training.config import TrainConfig

SITES = ("site-a", "site-b", "site-c")


def test_answers_so_far_are_shown_and_the_summary_is_left_to_the_central(tmp_path: Path) -> None:
    exp_store = ExperimentStore(LocalFolderStore(tmp_path), "exp1")
    start_experiment(exp_store, ExperimentConfig(name="exp1", sites=SITES, rounds=1, train=TrainConfig()))
    assert final_evaluation(exp_store) is None  # not asked for: "not scored"

    request = request_evaluation(exp_store, "final", {"final": {"w": torch.ones(3)}}, sites=SITES, timeout_s=3600.0)
    site_requests.answer(exp_store.store, request, "site-a", {"n_cases": 3, "metrics": {"final": {"dice_mean": 0.5}}})
    site_requests.fail(exp_store.store, request, "site-b", "no prepared case")
    before = sorted(exp_store.store.list(""))

    shown = final_evaluation(exp_store)
    assert shown is not None
    assert shown["sites"] == {"site-a": {"n_cases": 3, "metrics": {"final": {"dice_mean": 0.5}}}}
    assert shown["failed"] == {"site-b": "no prepared case"} and shown["waiting"] == ["site-c"]
    assert shown["weighted"] == {"final": {"dice_mean": 0.5}}
    assert sorted(exp_store.store.list("")) == before  # the page wrote nothing
    html = _scores(shown)
    assert "scored so far" in html and "scored on every site" not in html
    assert "Still scoring at: site-c" in html and "no prepared case" in html

    site_requests.answer(exp_store.store, request, "site-c", {"n_cases": 1, "metrics": {"final": {"dice_mean": 0.1}}})
    summary = summarise(exp_store.store, request)
    assert summary is not None and final_evaluation(exp_store) == summary and "waiting" not in summary
    assert "scored on every site" in _scores(summary)
    assert abs(summary["weighted"]["final"]["dice_mean"] - (3 * 0.5 + 0.1) / 4) < 1e-12
