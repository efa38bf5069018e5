"""Aggregation strategies behind one interface (:class:`Strategy`) and their registry.

``make_strategy("fedadam", eta=0.01)`` builds one by name; ``strategy_from_state(state)`` rebuilds a
persisted one, server state included.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from jipfed.federation.strategies.base import Strategy, StrategyState
from jipfed.federation.strategies.fedadagrad import FedAdagrad
from jipfed.federation.strategies.fedadam import FedAdam
from jipfed.federation.strategies.fedavg import FedAvg
from jipfed.federation.strategies.fedavgm import FedAvgM
from jipfed.federation.strategies.fedbn import FedBN
from jipfed.federation.strategies.feddyn import FedDyn
from jipfed.federation.strategies.fednova import FedNova
from jipfed.federation.strategies.fedopt import FedOpt
from jipfed.federation.strategies.fedprox import FedProx, proximal_term
from jipfed.federation.strategies.fedyogi import FedYogi
from jipfed.federation.strategies.median import Median
from jipfed.federation.strategies.scaffold import Scaffold
from jipfed.federation.strategies.schedules import Schedule
from jipfed.federation.strategies.trimmed_mean import TrimmedMean

STRATEGIES: Mapping[str, type[Strategy]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            FedAvg,
            FedProx,
            FedAvgM,
            FedAdagrad,
            FedAdam,
            FedYogi,
            Median,
            TrimmedMean,
            FedNova,
            Scaffold,
            FedDyn,
            FedBN,
        )
    }
)


def make_strategy(name: str, **kwargs: Any) -> Strategy:
    """The strategy registered as ``name``, built with ``kwargs``; ValueError for an unknown name."""
    try:
        cls = STRATEGIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}") from None
    return cls(**kwargs)


def strategy_from_state(state: StrategyState) -> Strategy:
    """Rebuild a strategy from :meth:`Strategy.state_dict` output, server state included."""
    strategy = make_strategy(state.strategy, **state.config)
    strategy.load_state_dict(state)
    return strategy


__all__ = [
    "STRATEGIES",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedBN",
    "FedDyn",
    "FedNova",
    "FedOpt",
    "FedProx",
    "FedYogi",
    "Median",
    "Scaffold",
    "Schedule",
    "Strategy",
    "StrategyState",
    "TrimmedMean",
    "make_strategy",
    "proximal_term",
    "strategy_from_state",
]
