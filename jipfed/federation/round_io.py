"""Where a plan step's models and decision record live in the store, and reading them back.

Shared by the round actions (start, accept, decide, compute, close, finalize): the keys of a step's
input and output models, loading a stored model through the codec, what an update of a step must
look like (:class:`ExpectedUpdate`) and the sample-count bound.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from jipfed.federation.bounds import sample_count_problem
from jipfed.federation.codec import decode_update
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.plans import PlanStep
from jipfed.federation.tickets import ProtocolError
from jipfed.federation.update import ModelUpdate, UpdateManifest
from jipfed.federation.validation import ExpectedUpdate, UpdateRejected
from jipfed.storage.state import ExperimentState, ExperimentStore, IntegrityError, Status, sha256_hex

logger = logging.getLogger(__name__)


def running_state(exp_store: ExperimentStore, what: str) -> ExperimentState:
    state = exp_store.load_state()
    if state.status is not Status.RUNNING:
        raise ProtocolError(
            f"experiment {exp_store.experiment!r} is {state.status.value}, cannot {what}"
            + (f" (error: {state.error})" if state.error else "")
        )
    return state


def input_keys(exp_store: ExperimentStore, ps: PlanStep) -> tuple[str, str]:
    """Keys (model, manifest) of the model step ``ps`` starts from."""
    lay = exp_store.layout
    if ps.hop:
        return lay.hop_model(ps.round, ps.hop - 1), lay.hop_manifest(ps.round, ps.hop - 1)
    return lay.global_model(ps.round), lay.global_manifest(ps.round)


def output_keys(exp_store: ExperimentStore, ps: PlanStep) -> tuple[str, str, int]:
    """Keys (model, manifest) of the model step ``ps`` produces, and that model's round."""
    lay = exp_store.layout
    if ps.is_last_in_round:
        nxt = ps.round + 1
        return lay.global_model(nxt), lay.global_manifest(nxt), nxt
    return lay.hop_model(ps.round, ps.hop or 0), lay.hop_manifest(ps.round, ps.hop or 0), ps.round


def decision_record_key(exp_store: ExperimentStore, ps: PlanStep) -> str:
    if ps.is_last_in_round:
        return exp_store.layout.aggregate(ps.round)
    return exp_store.layout.hop_record(ps.round, ps.hop or 0)


def load_model(
    exp_store: ExperimentStore, keys: tuple[str, str], config_hash: str
) -> tuple[dict[str, torch.Tensor], UpdateManifest, str]:
    """(weights, manifest, sha256) of a stored global / hop model, validated by the codec."""
    model_key, manifest_key = keys
    store = exp_store.store
    try:
        manifest = UpdateManifest.from_dict(store.get_json(manifest_key))
        payload = store.get_bytes(model_key)
        expected = ExpectedUpdate.for_global(
            experiment=exp_store.experiment,
            round=manifest.round,
            config_hash=config_hash,
            tensors=manifest.tensors,
        )
        update = decode_update(payload, manifest, expected)
    except (ValueError, UpdateRejected) as exc:
        raise IntegrityError(f"stored model {model_key!r} is invalid: {exc}") from exc
    return dict(update.tensors), update.manifest, sha256_hex(payload)


def put_once(exp_store: ExperimentStore, key: str, data: bytes) -> None:
    exp_store.store.put_if_absent_or_same(key, data)


def update_kind(config: ExperimentConfig) -> str:
    return "weights" if config.plan == "cyclic" else "delta"


def expected_update(
    exp_store: ExperimentStore,
    config: ExperimentConfig,
    config_hash: str,
    round_: int,
    site: str,
    start: Mapping[str, torch.Tensor],
) -> ExpectedUpdate:
    kind = update_kind(config)
    return ExpectedUpdate.from_weights(
        start,
        keep_reference=config.max_update_norm is not None and kind == "weights",
        experiment=exp_store.experiment,
        round=round_,
        site=site,
        config_hash=config_hash,
        kinds=(kind,),
        min_samples=1,
        max_delta_norm=config.max_update_norm,
    )


def check_sample_bound(exp_store: ExperimentStore, config: ExperimentConfig, update: ModelUpdate) -> None:
    """UpdateRejected when the update claims more cases than its site's cohort or the configured cap."""
    cohort = exp_store.reported_cohort(update.round, update.site)
    problem = sample_count_problem(update.n_samples, config.max_site_samples, cohort)
    if problem is not None:
        raise UpdateRejected(update.site, update.round, problem)
