"""Small real experiments for the page tests: sites train in process, one site fails a round.

Dispatch times are set an hour apart (in the past, with a long round timeout), so a round takes
exactly 3600 s on the pages.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from jipfed.federation.dispatch import (
    accept_in_time,
    dispatch_step,
    model_for_site,
    pending_work,
    report_site_failure,
    utcnow,
)
from jipfed.federation.evaluation import evaluate_at_site, request_evaluation, summarise
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.rounds import aggregate_step, finalize, start_experiment
from jipfed.federation.site_round import run_site_step
from jipfed.storage.base import ModelStore
from jipfed.storage.state import ExperimentStore
from jipfed.training.config import TrainConfig
from jipfed.training.local import LocalTrainer

SITES = ("site-a", "site-b", "site-c")
TRAIN = TrainConfig(size="tiny", steps=1, batch_size=2, lr=0.01, amp=False, augment=False)
FAILURE = "fetch_dicom failed: <PACS> unreachable"
ROUND_S = 3600.0


def run_experiment(
    store: ModelStore,
    trainers: Mapping[str, LocalTrainer],
    name: str,
    *,
    rounds: int,
    closed: int | None = None,
    failing: Mapping[int, str] | None = None,
    **config: Any,
) -> ExperimentStore:
    """Start ``name`` and close ``closed`` rounds (default all, then finalize); ``failing``: round -> site
    that reports a failure instead of an update. A run left open has its next step dispatched."""
    exp_store = ExperimentStore(store, name)
    cfg = ExperimentConfig(
        name=name,
        sites=SITES,
        rounds=rounds,
        train=TRAIN,
        min_sites=2,
        round_timeout_s=30 * 86400.0,
        **config,
    )
    start_experiment(exp_store, cfg)
    closed = rounds if closed is None else closed
    start = utcnow() - timedelta(seconds=ROUND_S * (closed + 1))
    for step in range(closed):
        dispatch_step(exp_store, step, now=start + timedelta(seconds=ROUND_S * step))
        for site in SITES:
            if (failing or {}).get(step) == site:
                report_site_failure(exp_store, site, step, step, FAILURE)
                continue
            payload, manifest = model_for_site(exp_store, site, step, step)
            [item] = [w for w in pending_work(store, site) if w.ticket.experiment == name]
            encoded = run_site_step(
                item.ticket, payload, manifest, trainers[site], site, name, exp_store.config_hash()
            )
            accept_in_time(exp_store, site, step, encoded.payload, encoded.manifest.to_json())
        aggregate_step(exp_store, step)
    if closed < rounds:
        dispatch_step(exp_store, closed, now=start + timedelta(seconds=ROUND_S * closed))
    else:
        finalize(exp_store)
    return exp_store


def score_final_model(exp_store: ExperimentStore, trainers: Mapping[str, LocalTrainer]) -> dict[str, Any]:
    """The federated evaluation of the final model on every site (``evaluation/final``), as the central runs it."""
    from jipfed.federation.codec import decode_update
    from jipfed.federation.update import UpdateManifest, spec_of
    from jipfed.federation.validation import ExpectedUpdate

    store, lay = exp_store.store, exp_store.layout
    manifest = UpdateManifest.from_dict(store.get_json(lay.final("model.json")))
    trainer = next(iter(trainers.values()))
    shared = {n: t for n, t in trainer.get_weights().items() if n in trainer.shared_names}
    check = ExpectedUpdate.for_global(
        experiment=exp_store.experiment,
        round=manifest.round,
        config_hash=exp_store.config_hash(),
        tensors=spec_of(shared),
    )
    weights = dict(decode_update(store.get_bytes(lay.final("model.safetensors")), manifest, check).tensors)
    request = request_evaluation(exp_store, "final", {"final": weights}, sites=SITES, timeout_s=3600.0)
    for site in SITES:
        evaluate_at_site(store, request, site, trainers[site])
    summary = summarise(store, request)
    assert summary is not None, "every site answered, so the summary is written"
    return summary
