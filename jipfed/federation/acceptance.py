"""Accepting a site's upload for the current step: may it upload now, check it once, store it once.

The payload is checked while its bytes pass (:func:`open_upload` → feed → :func:`finish_upload`),
and the check is recorded next to the stored update before its manifest commits it
(:func:`commit_checked`), so that deciding the step does not read the update again.
"""

from __future__ import annotations

import logging
from typing import Any

from jipfed.federation.arrival import arrival_checker, record_arrival, start_expectation
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.payload_stream import ArrivalCheck, PayloadChecker
from jipfed.federation.plans import PlanStep
from jipfed.federation.round_io import decision_record_key
from jipfed.federation.tickets import UpdateRefused, load_config
from jipfed.federation.update import UpdateManifest
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


def open_upload(
    exp_store: ExperimentStore, site: str, round: int, manifest_json: str | bytes
) -> PayloadChecker:
    """Check an upload is allowed and its manifest valid; the checker to feed its payload to.

    Reads no payload: the caller feeds the bytes while it writes them to the store and then calls
    :func:`finish_upload`.

    Raises:
        UpdateRefused: as :func:`check_upload_allowed`, or ``code="rejected"`` with the reason.
    """
    config, config_hash, ps = check_upload_allowed(exp_store, site, round)
    start = start_expectation(exp_store, config, config_hash, ps)
    try:
        return arrival_checker(exp_store, config, config_hash, round, site, manifest_json, start)
    except UpdateRejected as exc:
        raise _refuser(exp_store, site, round)("rejected", exc.reason) from exc


def finish_upload(exp_store: ExperimentStore, checker: PayloadChecker) -> ArrivalCheck:
    """The arrival check of a payload fed to ``checker``.

    Raises:
        UpdateRefused: ``code="rejected"`` with the first problem found in the payload.
    """
    man = checker.manifest
    try:
        return checker.finish()
    except UpdateRejected as exc:
        raise _refuser(exp_store, man.site, man.round)("rejected", exc.reason) from exc


def commit_checked(exp_store: ExperimentStore, check: ArrivalCheck, manifest: UpdateManifest) -> None:
    """Record the arrival check, then commit the update's manifest (the commit marker, never replaced).

    Raises:
        UpdateRefused: ``code="duplicate"`` when the site's update of the round is already committed.
    """
    record_arrival(exp_store, check)
    try:
        exp_store.commit_update_manifest(manifest.round, manifest.site, manifest.to_dict())
    except ObjectExistsError as exc:
        raise _refuser(exp_store, manifest.site, manifest.round)("duplicate", str(exc)) from exc


def accept_update(
    exp_store: ExperimentStore, site: str, round: int, payload: bytes, manifest_json: str | bytes
) -> UpdateManifest:
    """Check one site's upload for the current step once and store it (never overwriting).

    Raises:
        UpdateRefused: as :func:`open_upload` and :func:`finish_upload`; ``code="duplicate"`` also
            when a concurrent upload of the same site committed first.
    """
    checker = open_upload(exp_store, site, round, manifest_json)
    checker.feed(payload)
    check = finish_upload(exp_store, checker)
    # a payload without its manifest is a half-written update: never committed, so replaced
    exp_store.store.put_bytes(exp_store.layout.update(round, site), payload, overwrite=True)
    commit_checked(exp_store, check, checker.manifest)
    logger.info("experiment %s: accepted update of %s for round %d", exp_store.experiment, site, round)
    return checker.manifest
