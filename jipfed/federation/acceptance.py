"""Accepting a site's upload for the current step: may it upload now, is it valid, store it once."""

from __future__ import annotations

import logging
from typing import Any

from jipfed.federation.codec import decode_update
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.plans import PlanStep
from jipfed.federation.round_io import (
    check_sample_bound,
    decision_record_key,
    expected_update,
    input_keys,
    load_model,
)
from jipfed.federation.tickets import UpdateRefused, load_config
from jipfed.federation.update import ModelUpdate, UpdateManifest
from jipfed.federation.validation import UpdateRejected
from jipfed.storage.base import ObjectExistsError
from jipfed.storage.layout import validate_round, validate_slug
from jipfed.storage.state import ExperimentStore, Status

logger = logging.getLogger(__name__)


def _refuser(exp_store: ExperimentStore, site: str, round: int) -> Any:
    def refuse(code: str, reason: str) -> UpdateRefused:
        logger.warning(
            "experiment %s: refused update of %s for round %d: %s", exp_store.experiment, site, round, reason
        )
        return UpdateRefused(exp_store.experiment, site, round, code, reason)

    return refuse


def check_upload_allowed(
    exp_store: ExperimentStore, site: str, round: int
) -> tuple[ExperimentConfig, str, PlanStep]:
    """Whether ``site`` may upload its update of ``round`` now: ``(config, config_hash, plan step)``.

    Reads only small objects (config, state, markers), so the endpoint calls it before it reads
    an upload's body. A payload without its manifest (a half-written update) does not count as
    uploaded: the retry replaces it.

    Raises:
        UpdateRefused: the round is closed (``code="late"``), not the current one, the site is not
            selected for the current step, it already uploaded, or the experiment is not running.
    """
    validate_slug(site, "site id")
    validate_round(round)
    refuse = _refuser(exp_store, site, round)
    config, config_hash = load_config(exp_store)
    plan = config.make_plan()
    if exp_store.store.exists(exp_store.layout.aggregate(round)):
        raise refuse("late", f"late update refused: round {round} is already closed (aggregated)")
    state = exp_store.load_state()
    if state.status is not Status.RUNNING:
        raise refuse("not_running", f"the experiment is {state.status.value}")
    if state.next_step >= plan.n_steps:
        raise refuse("late", "late update refused: every step of the plan is complete")
    ps = plan.step(state.next_step)
    if round != ps.round:
        code = "late" if round < ps.round else "wrong_round"
        raise refuse(code, f"the current step {ps.step} belongs to round {ps.round}, not round {round}")
    if exp_store.store.exists(decision_record_key(exp_store, ps)):
        raise refuse("late", f"late update refused: step {ps.step} of round {round} is already decided")
    if exp_store.update_committed(round, site):
        raise refuse(
            "duplicate", f"site {site!r} already uploaded an update for round {round}; never overwritten"
        )
    if site not in ps.sites:
        raise refuse(
            "not_selected", f"site {site!r} is not selected for step {ps.step} (selected: {list(ps.sites)})"
        )
    return config, config_hash, ps


def validate_upload(
    exp_store: ExperimentStore, site: str, round: int, payload: bytes, manifest_json: str | bytes
) -> ModelUpdate:
    """Check an upload is allowed and decode it against the step's start model (nothing stored).

    Raises:
        UpdateRefused: as :func:`check_upload_allowed`, or ``code="rejected"`` with the codec's reason.
    """
    config, config_hash, ps = check_upload_allowed(exp_store, site, round)
    start, _, _ = load_model(exp_store, input_keys(exp_store, ps), config_hash)
    try:
        update = decode_update(
            payload, manifest_json, expected_update(exp_store, config, config_hash, round, site, start)
        )
        check_sample_bound(exp_store, config, update)
    except UpdateRejected as exc:
        raise _refuser(exp_store, site, round)("rejected", exc.reason) from exc
    return update


def accept_update(
    exp_store: ExperimentStore, site: str, round: int, payload: bytes, manifest_json: str | bytes
) -> UpdateManifest:
    """Validate one site's upload for the current step and store it (never overwriting).

    Raises:
        UpdateRefused: as :func:`validate_upload`; ``code="duplicate"`` also when a concurrent upload
            of the same site committed first.
    """
    update = validate_upload(exp_store, site, round, payload, manifest_json)
    try:
        exp_store.save_update(round, site, payload, update.manifest.to_dict())
    except ObjectExistsError as exc:
        raise _refuser(exp_store, site, round)("duplicate", str(exc)) from exc
    logger.info("experiment %s: accepted update of %s for round %d", exp_store.experiment, site, round)
    return update.manifest
