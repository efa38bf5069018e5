"""Deciding a step: which stored updates are in, which are rejected (and why), who is missing; quorum.

The decision is written (``aggregate.json``) before anything derived from it, so a rerun after a
crash completes the step from the stored decision.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from jipfed.federation.bounds import Clip, delta_norm, norm_clips
from jipfed.federation.codec import decode_update
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.plans import PlanStep
from jipfed.federation.round_io import check_sample_bound, expected_update
from jipfed.federation.tickets import QuorumNotMet
from jipfed.federation.update import ModelUpdate, UpdateManifest
from jipfed.federation.validation import UpdateRejected
from jipfed.storage.base import StoreError
from jipfed.storage.state import ExperimentState, ExperimentStore, IntegrityError

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
    start: Mapping[str, torch.Tensor],
) -> Decision:
    """Validate every stored update of the step's round that this step could use."""
    decision = Decision(included=[], rejected={}, missing=[], manifests={})
    norms: dict[str, float] = {}
    present = set(exp_store.list_updates(ps.round))
    for site in sorted(present):
        if site not in ps.sites:
            # Another hop's site in a cyclic round, or an upload that bypassed accept_update.
            if config.plan == "parallel":
                decision.rejected[site] = f"site {site!r} was not selected for round {ps.round}"
            continue
        try:
            update = read_update(exp_store, config, config_hash, ps.round, site, start)
            check_sample_bound(exp_store, config, update)
            if config.plan == "parallel":
                norms[site] = delta_norm(update, start)
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
        decision.manifests[site] = update.manifest
    decision.clips = norm_clips(norms, config.norm_bound_factor)
    for site, clip in decision.clips.items():
        logger.warning("experiment %s: round %d: %s: %s", config.name, ps.round, site, clip.reason())
    decision.missing = [s for s in ps.sites if s not in present]
    failures = exp_store.site_failures(ps.round) if decision.missing else {}
    decision.missing_reasons = {
        site: str(failures.get(site, {}).get("reason") or NO_UPDATE_REASON) for site in decision.missing
    }
    return decision


def read_update(
    exp_store: ExperimentStore,
    config: ExperimentConfig,
    config_hash: str,
    round_: int,
    site: str,
    start: Mapping[str, torch.Tensor],
) -> ModelUpdate:
    try:
        payload, manifest = exp_store.load_update(round_, site)
    except (IntegrityError, StoreError) as exc:
        raise UpdateRejected(site, round_, str(exc)) from exc
    return decode_update(
        payload, manifest, expected_update(exp_store, config, config_hash, round_, site, start)
    )


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
