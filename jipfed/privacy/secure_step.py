"""The central's aggregate step of a secure-aggregation round: unmask the sum, step the strategy, persist.

Called by :func:`jipfed.federation.closing.aggregate_step` for experiments with
``privacy.secure_aggregation``. The complete attempt's masked vectors (:mod:`jipfed.privacy.secagg_wire`)
sum to the weighted sum of the sites' deltas and their total weight; their weighted mean delta goes to
the configured (mean-based) strategy as one update of site :data:`SUM_SITE`. The round record
(``aggregate.json``) lists the sites of the complete attempt as included, the dropped ones as missing
with the reason, and every failed attempt under ``secure_aggregation.retries``. The central never
holds an individual site's update.

With client-level DP the sites clipped and noised their deltas (:mod:`jipfed.privacy.secure_dp`,
weight 1 each): the unmasked mean is DP-FedAvg's noised mean; the DP strategy checks the budget and
accounts it as one release without adding noise (``aggregate(noised_at_sites=n)``), and the record
gets the same ``privacy`` fields as the central-noise path plus ``secure_aggregation.noise`` (the
declared shares). The budget is checked before the sum is unmasked.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from jipfed.federation.codec import write_global_file
from jipfed.federation.compute import strategy_for
from jipfed.federation.decision import Decision
from jipfed.federation.dispatch import load_dispatch
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.plans import PlanStep
from jipfed.federation.round_io import decision_record_key, input_keys, load_weights, open_model, put_once
from jipfed.federation.tickets import QuorumNotMet
from jipfed.federation.update import ModelUpdate, UpdateManifest
from jipfed.privacy import secagg, secagg_wire, secure_dp
from jipfed.storage.base import canonical_json
from jipfed.storage.state import ExperimentState, ExperimentStore, StepRecord

logger = logging.getLogger(__name__)

#: The site id of the one unmasked-mean update the strategy receives.
SUM_SITE = "secagg-sum"


def _not_complete(
    config: ExperimentConfig, ps: PlanStep, view: secagg_wire.AttemptView | None
) -> QuorumNotMet:
    missing = list(ps.sites) if view is None else sorted(set(ps.sites) - set(view.masked))
    reasons = {}
    for failed in [] if view is None else view.history + ([{**view.failed}] if view.failed else []):
        reasons.update(failed.get("dropped", {}))
    return QuorumNotMet(config.name, ps.step, ps.round, config.min_quorum, (), {}, missing, reasons)


def secure_record(
    config: ExperimentConfig,
    config_hash: str,
    ps: PlanStep,
    view: secagg_wire.AttemptView,
    manifests: dict[str, dict[str, Any]],
    weight: float,
    shas: tuple[str, str],
    noise: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The round record: the ordinary keys plus ``secure_aggregation`` (attempt, retries, total weight,
    with client-level DP the sites' ``noise`` shares)."""
    from jipfed.federation.closing import record_dict

    dropped: dict[str, str] = {}
    for failed in view.history:
        dropped.update(failed["dropped"])
    missing = sorted(set(ps.sites) - set(view.sites))
    reasons = {site: dropped.get(site, "not in the secure-aggregation attempt") for site in missing}
    decision = Decision(list(view.sites), {}, missing, {}, reasons)
    sites = {site: dict(m["metrics"]) for site, m in sorted(manifests.items())}
    common = set.intersection(*(set(m) for m in sites.values())) if sites else set()
    return {
        **record_dict(config, config_hash, ps, decision, *shas),
        "n_samples": round(weight),
        # unweighted: a site's sample count is hidden in the masked sum
        "metrics": {name: sum(m[name] for m in sites.values()) / len(sites) for name in sorted(common)},
        "sites": sites,
        "secure_aggregation": {
            "dispatch_attempt": view.dispatch_attempt,
            "attempt": view.attempt,
            "sites": list(view.sites),
            "total_weight": weight,
            "retries": view.history,
            **({"noise": noise} if noise is not None else {}),
        },
    }


def aggregate_secure_step(
    exp_store: ExperimentStore,
    config: ExperimentConfig,
    config_hash: str,
    ps: PlanStep,
    state: ExperimentState,
) -> StepRecord:
    """Aggregate step ``ps`` of a secure-aggregation experiment from its complete attempt.

    Raises:
        QuorumNotMet: no attempt completed (the drop-outs and their reasons named), or the complete
            attempt has fewer sites than the quorum; nothing is written.
    """
    from jipfed.federation.closing import to_step_record, write_outputs

    settings = secagg_wire.settings_of(config.privacy)
    assert settings is not None  # the caller checked
    dispatch = load_dispatch(exp_store, ps.round, ps.step)
    if dispatch is None:
        raise _not_complete(config, ps, None)
    view = secagg_wire.advance(exp_store, dispatch, settings)
    if not view.complete or len(view.sites) < config.min_quorum:
        raise _not_complete(config, ps, view)
    with tempfile.TemporaryDirectory(prefix="jipfed-secagg-") as tmp:
        with open_model(exp_store, input_keys(exp_store, ps), config_hash, Path(tmp)) as start:
            global_weights = load_weights(start)
            start_manifest: UpdateManifest = start.manifest
        length = secagg_wire.vector_length(start_manifest)
        strategy = strategy_for(exp_store, config, ps.round)
        share = secure_dp.noise_share(config)
        if share is not None:
            secure_dp.check_budget(strategy, ps.round)  # before the noised sum is unmasked
        mean, weight, manifests = secagg_wire.unmask_attempt(exp_store, view, settings, length)
        noise = None
        if share is not None:
            where = f"experiment {config.name!r}, round {ps.round}, attempt {view.attempt}"
            noise = secure_dp.total_noise(manifests, share, where)
            if round(weight) != len(view.sites):
                raise ValueError(f"{where}: total weight {weight} != {len(view.sites)} sites of weight 1")
        delta = secagg.unflatten(mean, global_weights)
        summed = ModelUpdate.build(
            delta,
            experiment=config.name,
            round=ps.round,
            site=SUM_SITE,
            kind="delta",
            n_samples=max(1, round(weight)),
            config_hash=config_hash,
        )
        if share is None:
            weights = strategy.aggregate(global_weights, [summed], ps.round)
        else:
            weights = strategy.aggregate(global_weights, [summed], ps.round, noised_at_sites=len(view.sites))
        strategy_state = strategy.state_dict()
        encoded = write_global_file(
            {name: weights[name] for name in global_weights},
            Path(tmp) / "output.safetensors",
            experiment=config.name,
            round=ps.round + 1,
            config_hash=config_hash,
            n_samples=round(weight),
        )
        record = secure_record(
            config,
            config_hash,
            ps,
            view,
            manifests,
            weight,
            (start_manifest.sha256 or "", encoded.manifest.sha256 or ""),
            noise,
        )
        if strategy_state.meta.get("privacy"):
            record["privacy"] = dict(strategy_state.meta["privacy"])  # as jipfed.federation.closing does
        put_once(exp_store, decision_record_key(exp_store, ps), canonical_json(record))
        write_outputs(exp_store, ps, encoded, strategy_state)
    step_record = to_step_record(record)
    exp_store.save_state(state.complete_step(step_record, next_round=ps.round + 1))
    logger.info(
        "experiment %s: round %d aggregated by secure aggregation (attempt %d, sites %s, %d failed attempt(s))",
        config.name,
        ps.round,
        view.attempt,
        list(view.sites),
        len(view.history),
    )
    return step_record
