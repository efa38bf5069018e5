"""Finishing an experiment: publish the final model, its model card and the metrics under ``final/``."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from jipfed.federation.round_io import running_state
from jipfed.federation.tickets import ProtocolError, load_config
from jipfed.storage.base import canonical_json
from jipfed.storage.state import ExperimentStore, Status

logger = logging.getLogger(__name__)


MODEL_CARD = "model_card.json"

FINAL_MODEL = "model"

FINAL_METRICS = "metrics.json"


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def finalize(exp_store: ExperimentStore, evaluation: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Publish the final model, a short model card and the metrics under ``final/``; finish.

    ``evaluation`` (optional, JSON numbers) is added to the model card, e.g. the simulator's
    held-out Dice of the final model. Idempotent: a finished experiment returns its stored card.

    Raises:
        ProtocolError: steps of the plan are still open.
    """
    config, config_hash = load_config(exp_store)
    plan = config.make_plan()
    state = exp_store.load_state()
    lay = exp_store.layout
    if state.status is Status.FINISHED:
        return exp_store.store.get_json(lay.final(MODEL_CARD))
    state = running_state(exp_store, "finalize")
    if state.next_step < plan.n_steps:
        raise ProtocolError(
            f"experiment {config.name!r}: cannot finalize, {plan.n_steps - state.next_step} step(s) still open "
            f"(next is step {state.next_step})"
        )
    payload, manifest = exp_store.load_global(config.rounds)
    last_round = [r for r in state.history if r.round == config.rounds - 1]
    card = {
        "experiment": config.name,
        "config_hash": config_hash,
        "model": {
            "task": config.train.task,
            "architecture": config.train.model,
            "size": config.train.size,
            "in_channels": config.in_channels,
            "outputs": "3 sigmoid region channels WT, TC, ET"
            if config.train.task == "segmentation"
            else "2 logits (LGG, HGG)",
            "sha256": manifest.get("sha256"),
            "file": f"{FINAL_MODEL}.safetensors",
        },
        "training": {
            "plan": config.plan,
            "strategy": config.strategy,
            "strategy_kwargs": dict(config.strategy_kwargs),
            "rounds": config.rounds,
            "sites": list(config.sites),
            "local_epochs": config.train.epochs,
            "local_steps": config.train.steps,
            "proportional_steps": config.proportional_steps,
            "encoding": config.encoding,
            "privacy": dict(config.privacy) or "off",
        },
        "participation": {
            "steps": len(state.history),
            "included_per_step": [len(r.included) for r in state.history],
            "rejected": {str(r.step): dict(r.rejected) for r in state.history if r.rejected},
            "training_cases_last_round": sum(int(r.metrics.get("n_samples", 0)) for r in last_round),
        },
        "evaluation": {k: _finite_or_none(v) for k, v in (evaluation or {}).items()},
        "intended_use": "research; trained on the sites' data under the stored config; not for clinical use",
    }
    metrics = {"experiment": config.name, "steps": [r.to_dict() for r in state.history]}
    store = exp_store.store
    store.put_if_absent_or_same(lay.final(f"{FINAL_MODEL}.safetensors"), payload)
    store.put_if_absent_or_same(lay.final(f"{FINAL_MODEL}.json"), canonical_json(manifest))
    store.put_if_absent_or_same(lay.final(FINAL_METRICS), canonical_json(metrics))
    store.put_if_absent_or_same(lay.final(MODEL_CARD), canonical_json(card))
    exp_store.save_state(state.finish())
    logger.info("experiment %s: finished; final model %s", config.name, manifest.get("sha256"))
    return card
