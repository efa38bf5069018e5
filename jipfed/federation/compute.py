"""Computing a step's output model from its decided updates (and the server strategy state)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence

import torch

from jipfed.federation.bounds import Clip, scaled
from jipfed.federation.codec import EncodedUpdate, encode_global
from jipfed.federation.decision import read_update
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.plans import PlanStep
from jipfed.federation.round_io import output_keys
from jipfed.federation.strategies import Strategy, StrategyState
from jipfed.federation.update import ModelUpdate
from jipfed.storage.base import StoreError
from jipfed.storage.state import ExperimentStore, IntegrityError

logger = logging.getLogger(__name__)


def strategy_for(exp_store: ExperimentStore, config: ExperimentConfig, round_: int) -> Strategy:
    """The strategy with the server state it had after round ``round_ - 1``."""
    strategy = config.make_strategy()
    if round_ == 0:
        return strategy
    lay = exp_store.layout
    try:
        payload = exp_store.store.get_bytes(lay.strategy_state(round_ - 1))
        text = exp_store.store.get_bytes(lay.strategy_state_manifest(round_ - 1))
        strategy.load_state_dict(StrategyState.from_payload(payload, text))
    except (StoreError, ValueError) as exc:
        raise IntegrityError(
            f"experiment {config.name!r}: server strategy state after round {round_ - 1} is missing or invalid: {exc}"
        ) from exc
    return strategy


def compute_output(
    exp_store: ExperimentStore,
    config: ExperimentConfig,
    config_hash: str,
    ps: PlanStep,
    start: Mapping[str, torch.Tensor],
    included: Sequence[str],
    clips: Mapping[str, Clip],
) -> tuple[EncodedUpdate, StrategyState | None]:
    """The step's output model (encoded) and, for parallel plans, the new server state."""
    _, _, out_round = output_keys(exp_store, ps)
    state: StrategyState | None = None
    n_samples = 0

    def updates() -> Iterator[ModelUpdate]:
        nonlocal n_samples
        for site in included:  # decoded one at a time: the strategy streams over them
            update = read_update(exp_store, config, config_hash, ps.round, site, start)
            n_samples += update.n_samples
            yield scaled(update, start, clips[site].scale) if site in clips else update

    if config.plan == "parallel":
        strategy = strategy_for(exp_store, config, ps.round)
        weights = strategy.aggregate(start, updates(), ps.round)
        state = strategy.state_dict()
    elif included:
        weights = dict(next(updates()).tensors)
    else:
        weights = dict(start)
    encoded = encode_global(
        weights, experiment=config.name, round=out_round, config_hash=config_hash, n_samples=n_samples
    )
    return encoded, state
