"""Closing a plan step: decide, check the quorum, compute, write the record, the outputs and the state.

``aggregate_step`` first decides (which updates are in, which are rejected and why), writes that
decision (``aggregate.json``, or ``hops/<h>-aggregate.json`` for a cyclic hop) and only then the
outputs derived from it (server strategy state, next model) and finally the experiment state. A
rerun after a crash anywhere in between completes the step from the stored decision and
produces the same bytes; a rerun of a completed step returns its stored record.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jipfed.federation.codec import EncodedFile
from jipfed.federation.compute import compute_output, hash_pipeline
from jipfed.federation.decision import Decision, check_quorum, decide
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.gc_pause import collector_paused
from jipfed.federation.plans import PlanStep
from jipfed.federation.round_io import (
    decision_record_key,
    input_keys,
    open_model,
    output_keys,
    put_file_once,
    put_once,
    running_state,
)
from jipfed.federation.strategies import StrategyState
from jipfed.federation.tickets import ProtocolError, load_config
from jipfed.federation.update import UpdateManifest
from jipfed.storage.base import PendingObject, canonical_json
from jipfed.storage.state import ExperimentStore, IntegrityError, StepRecord

logger = logging.getLogger(__name__)


RECORD_FORMAT = 1


def weighted_metrics(manifests: Mapping[str, UpdateManifest]) -> dict[str, float]:
    """Sample-weighted mean of each metric every included site reported."""
    if not manifests:
        return {}
    common = set.intersection(*(set(m.metrics) for m in manifests.values()))
    total = sum(m.n_samples for m in manifests.values())
    return {
        name: sum(m.metrics[name] * m.n_samples for m in manifests.values()) / total
        for name in sorted(common)
    }


def record_dict(
    config: ExperimentConfig,
    config_hash: str,
    ps: PlanStep,
    decision: Decision,
    input_sha: str,
    output_sha: str,
) -> dict[str, Any]:
    site_metrics = {
        site: {"n_samples": m.n_samples, **dict(m.metrics)} for site, m in sorted(decision.manifests.items())
    }
    return {
        "format": RECORD_FORMAT,
        "experiment": config.name,
        "config_hash": config_hash,
        "plan": config.plan,
        "strategy": config.strategy,
        "step": ps.step,
        "round": ps.round,
        "hop": ps.hop,
        "selected": list(ps.sites),
        "included": list(decision.included),
        "rejected": dict(sorted(decision.rejected.items())),
        "bounded": {site: clip.to_dict() for site, clip in sorted(decision.clips.items())},
        "missing": list(decision.missing),
        "missing_reasons": dict(sorted(decision.missing_reasons.items())),
        "n_samples": sum(m.n_samples for m in decision.manifests.values()),
        "metrics": weighted_metrics(decision.manifests),
        "sites": site_metrics,
        "input_sha256": input_sha,
        "output_sha256": output_sha,
    }


def to_step_record(record: Mapping[str, Any]) -> StepRecord:
    return StepRecord(
        step=record["step"],
        round=record["round"],
        included=tuple(record["included"]),
        rejected=record["rejected"],
        metrics={
            "n_samples": record["n_samples"],
            **record["metrics"],
            "missing": record["missing"],
            "sites": record["sites"],
            "output_sha256": record["output_sha256"],
            **({"privacy": record["privacy"]} if "privacy" in record else {}),
        },
    )


def write_outputs(
    exp_store: ExperimentStore,
    ps: PlanStep,
    encoded: EncodedFile,
    strategy_state: StrategyState | None,
    pending: PendingObject | None = None,
) -> None:
    """Server strategy state, next model (``pending``: already written in place) and its manifest, in this order."""
    lay = exp_store.layout
    if strategy_state is not None:
        payload, text = strategy_state.to_payload()
        put_once(exp_store, lay.strategy_state(ps.round), payload)
        put_once(exp_store, lay.strategy_state_manifest(ps.round), text.encode("utf-8"))
    model_key, manifest_key, _ = output_keys(exp_store, ps)
    put_file_once(exp_store, model_key, encoded, pending)
    put_once(exp_store, manifest_key, canonical_json(encoded.manifest.to_dict()))


def _stored_decision(
    exp_store: ExperimentStore, config: ExperimentConfig, ps: PlanStep
) -> dict[str, Any] | None:
    """The step's stored decision record when it was decided before a restart, else None."""
    record_key = decision_record_key(exp_store, ps)
    if not exp_store.store.exists(record_key):
        return None
    logger.info("experiment %s: step %d was decided before a restart; completing it", config.name, ps.step)
    return exp_store.store.get_json(record_key)


@collector_paused()  # a full collection over torch's objects costs more than some steps
def aggregate_step(exp_store: ExperimentStore, step: int) -> StepRecord:
    """Close plan step ``step``: validate its updates, check the quorum, aggregate, persist.

    Writes the step's decision record (``aggregate.json`` with included / rejected sites and
    reasons, missing sites and metrics; a non-final cyclic hop writes ``hops/<h>-aggregate.json``),
    the server strategy state, the next model, and completes the step in the experiment state.
    Re-running a completed step returns its stored record and changes nothing.

    Raises:
        QuorumNotMet: too few valid updates; nothing is written.
        ProtocolError: the experiment is not running or ``step`` is not the next step.
    """
    config, config_hash = load_config(exp_store)
    plan = config.make_plan()
    state = exp_store.load_state()
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < plan.n_steps:
        raise ProtocolError(f"experiment {config.name!r}: step must be in [0, {plan.n_steps}), got {step!r}")
    if step < state.next_step:
        logger.info("experiment %s: step %d is already complete", config.name, step)
        return state.history[step]
    state = running_state(exp_store, f"aggregate step {step}")
    if step > state.next_step:
        raise ProtocolError(
            f"experiment {config.name!r}: step {step} cannot run before step {state.next_step}"
        )
    ps = plan.step(step)
    if config.privacy.get("secure_aggregation"):  # only the masked sum exists: jipfed/privacy/secure_step.py
        from jipfed.privacy.secure_step import aggregate_secure_step

        return aggregate_secure_step(exp_store, config, config_hash, ps, state)
    with (
        tempfile.TemporaryDirectory(prefix="jipfed-aggregate-") as tmp,
        open_model(exp_store, input_keys(exp_store, ps), config_hash, Path(tmp)) as start,
        hash_pipeline(start) as hashing,
        # written where it will be stored, published only after the decision record
        exp_store.store.pending(output_keys(exp_store, ps)[0], Path(tmp)) as output,
    ):
        start.hashing = hashing
        record = _stored_decision(exp_store, config, ps)
        decision = Decision.from_record(record) if record is not None else None
        if decision is None:
            decision = decide(exp_store, config, config_hash, ps, start, Path(tmp))
            check_quorum(exp_store, config, ps, state, decision)

        def on_exclusion(changed: Decision) -> None:
            if record is not None:  # the recorded decision cannot change: the step cannot complete
                raise IntegrityError(
                    f"experiment {config.name!r}, step {step}: a recorded update changed: {changed.rejected}"
                )
            check_quorum(exp_store, config, ps, state, changed)

        encoded, strategy_state = compute_output(
            exp_store, config, config_hash, ps, start, decision, Path(tmp), on_exclusion, hashing, output.path
        )
        if record is None:
            input_sha = start.manifest.sha256 or ""
            record = record_dict(config, config_hash, ps, decision, input_sha, encoded.manifest.sha256 or "")
            if ps.is_last_in_round and ps.hop is not None:
                record["hops"] = [hop_summary(r) for r in state.history if r.round == ps.round]
            if strategy_state is not None and strategy_state.meta.get("privacy"):
                record["privacy"] = dict(strategy_state.meta["privacy"])  # what a DP strategy spent
            put_once(exp_store, decision_record_key(exp_store, ps), canonical_json(record))
        elif record["output_sha256"] != encoded.manifest.sha256:
            raise IntegrityError(
                f"experiment {config.name!r}, step {step}: recomputed model {encoded.manifest.sha256} differs from "
                f"the recorded {record['output_sha256']}"
            )
        write_outputs(exp_store, ps, encoded, strategy_state, output)
    step_record = to_step_record(record)
    next_round = plan.step(step + 1).round if step + 1 < plan.n_steps else ps.round + 1
    exp_store.save_state(state.complete_step(step_record, next_round=next_round))
    logger.info(
        "experiment %s: step %d (round %d) aggregated: included %s, rejected %s, missing %s",
        config.name,
        step,
        ps.round,
        list(decision.included),
        sorted(decision.rejected),
        decision.missing,
    )
    return step_record


def hop_summary(record: StepRecord) -> dict[str, Any]:
    return {
        "step": record.step,
        "included": list(record.included),
        "rejected": dict(record.rejected),
        "n_samples": record.metrics.get("n_samples", 0),
    }
