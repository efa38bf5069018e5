"""Deciding a step: which stored updates are in, which are rejected (and why), who is missing; quorum.

The decision is written (``aggregate.json``) before anything derived from it, so a rerun after a
crash completes the step from the stored decision.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jipfed.federation.arrival import check_stored, recorded_arrival
from jipfed.federation.bounds import Clip, norm_clips
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.payload_stream import StoredUpdate
from jipfed.federation.plans import PlanStep
from jipfed.federation.round_io import check_sample_bound, load_weights, needs_start_weights, update_kind
from jipfed.federation.tickets import QuorumNotMet
from jipfed.federation.update import UpdateManifest
from jipfed.federation.validation import ExpectedUpdate, UpdateRejected, check_manifest
from jipfed.storage.base import StoreError
from jipfed.storage.state import ExperimentState, ExperimentStore

logger = logging.getLogger(__name__)


#: Why a selected site is missing when it reported nothing and no timeout was recorded.
NO_UPDATE_REASON = "no update received before the step closed"


@dataclass
class Decision:
    """Which sites' updates a step uses (with their manifests and norm clips), rejects, or misses."""

    included: list[str]
    rejected: dict[str, str]
    missing: list[str]
    manifests: dict[str, UpdateManifest]
    missing_reasons: dict[str, str] = field(default_factory=dict)
    clips: dict[str, Clip] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Decision:
        """The decision a stored step record (``aggregate.json``) holds, to complete the step after a crash."""
        decision = cls(list(record["included"]), dict(record["rejected"]), list(record["missing"]), {})
        decision.clips = {
            site: Clip(b["norm"], b["bound"], b["scale"]) for site, b in record.get("bounded", {}).items()
        }
        return decision


def decide(
    exp_store: ExperimentStore,
    config: ExperimentConfig,
    config_hash: str,
    ps: PlanStep,
    start: StoredUpdate,
    workdir: Path,
) -> Decision:
    """Which stored updates of the step's round this step uses, from their arrival checks.

    An update is used when its manifest is this step's and its arrival check (recorded when it was
    received) covers exactly its bytes; the payloads are not read. An update without such a record
    is checked from the store once (and recorded).
    """
    decision = Decision(included=[], rejected={}, missing=[], manifests={})
    norms: dict[str, float] = {}
    present = set(exp_store.list_updates(ps.round))
    expectation = None
    for site in sorted(present):
        if site not in ps.sites:
            # Another hop's site in a cyclic round, or an upload that bypassed accept_update.
            if config.plan == "parallel":
                decision.rejected[site] = f"site {site!r} was not selected for round {ps.round}"
            continue
        try:
            manifest = committed_manifest(exp_store, config, config_hash, start, ps.round, site)
            check = recorded_arrival(exp_store, manifest)
            if check is None:
                if expectation is None:
                    expectation = (
                        start.manifest.tensors,
                        load_weights(start) if needs_start_weights(config) else None,
                    )
                check = check_stored(exp_store, config, config_hash, ps.round, site, expectation, workdir)
            check_sample_bound(exp_store, config, manifest)
            if config.plan == "parallel" and check.delta_norm is not None:
                norms[site] = check.delta_norm
        except UpdateRejected as exc:
            decision.rejected[site] = exc.reason
            logger.warning(
                "experiment %s: round %d: rejected %s: %s", config.name, ps.round, site, exc.reason
            )
            continue
        except Exception as exc:  # one unreadable update never blocks the step
            logger.exception(
                "experiment %s: round %d: cannot use the update of %s", config.name, ps.round, site
            )
            decision.rejected[site] = f"the update could not be used ({type(exc).__name__})"
            continue
        decision.included.append(site)
        decision.manifests[site] = manifest
    decision.clips = norm_clips(norms, config.norm_bound_factor)
    for site, clip in decision.clips.items():
        logger.warning("experiment %s: round %d: %s: %s", config.name, ps.round, site, clip.reason())
    decision.missing = [s for s in ps.sites if s not in present]
    failures = exp_store.site_failures(ps.round) if decision.missing else {}
    decision.missing_reasons = {
        site: str(failures.get(site, {}).get("reason") or NO_UPDATE_REASON) for site in decision.missing
    }
    return decision


def committed_manifest(
    exp_store: ExperimentStore,
    config: ExperimentConfig,
    config_hash: str,
    start: StoredUpdate,
    round_: int,
    site: str,
) -> UpdateManifest:
    """``site``'s committed manifest of ``round_``, checked against the step (identity, kind, specs).

    Raises:
        UpdateRejected: it is unreadable or not an update of this step.
    """
    try:
        data = exp_store.store.get_json(exp_store.layout.update_manifest(round_, site))
        manifest = UpdateManifest.from_dict(data)
    except (StoreError, ValueError) as exc:
        raise UpdateRejected(site, round_, f"invalid manifest: {exc}") from None
    identity = ExpectedUpdate(
        experiment=exp_store.experiment,
        round=round_,
        site=site,
        config_hash=config_hash,
        tensors=start.manifest.tensors,
        kinds=(update_kind(config),),
    )
    check_manifest(manifest, identity)
    if manifest.sha256 is None:
        raise UpdateRejected(site, round_, "manifest has no sha256")
    return manifest


def check_quorum(
    exp_store: ExperimentStore,
    config: ExperimentConfig,
    ps: PlanStep,
    state: ExperimentState,
    decision: Decision,
) -> None:
    if config.plan == "parallel":
        required = config.min_quorum
        ok = len(decision.included) >= required
    else:
        # A cyclic hop without a valid update passes the model on unchanged, as long as the round
        # can still have min_sites successful hops.
        required = 1
        failed_before = sum(1 for r in state.history if r.round == ps.round and not r.included)
        ok = bool(decision.included) or failed_before + 1 <= len(config.sites) - config.min_quorum
    if not ok:
        raise QuorumNotMet(
            config.name,
            ps.step,
            ps.round,
            required,
            decision.included,
            decision.rejected,
            decision.missing,
            decision.missing_reasons,
        )
