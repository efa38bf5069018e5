from __future__ import annotations

import pytest

from jipfed.federation.names import STRATEGY_NAMES
from jipfed.federation.strategies import (
    STRATEGIES,
    FedAdam,
    FedAvg,
    StrategyState,
    make_strategy,
    strategy_from_state,
)


def test_registry_names_every_strategy() -> None:
    # the names the trigger form offers without importing torch are exactly the registry's
    assert sorted(STRATEGIES) == sorted(STRATEGY_NAMES)
    for name, cls in STRATEGIES.items():
        strategy = make_strategy(name)
        assert isinstance(strategy, cls) and strategy.name == name
        # config() rebuilds the same strategy: what the experiment config stores
        assert make_strategy(name, **strategy.config()).config() == strategy.config()


def test_make_strategy_errors() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'"):
        make_strategy("fedsgd")
    with pytest.raises(TypeError):
        make_strategy("fedavg", eta=0.1)
    assert isinstance(make_strategy("fedadam", eta=0.01), FedAdam)


def test_stateless_state_round_trip() -> None:
    state = FedAvg(accumulate_dtype="float64").state_dict()
    restored = strategy_from_state(StrategyState.from_payload(*state.to_payload()))
    assert isinstance(restored, FedAvg) and restored.config() == {
        "accumulate_dtype": "float64",
        "integer_mode": "max",
    }
    with pytest.raises(ValueError, match="stateless"):
        FedAvg().load_state_dict(
            StrategyState(strategy="fedavg", config=FedAvg().config(), meta={"steps": 1})
        )
