"""ExperimentConfig: JSON round trip, validation naming the experiment, plan and strategy building."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.plans import CyclicPlan, ParallelPlan
from jipfed.federation.strategies import FedAdam
from jipfed.storage.base import canonical_json
from jipfed.training.config import TrainConfig

SITES = ("site-a", "site-b", "site-c")


def make(**overrides: Any) -> ExperimentConfig:
    values: dict[str, Any] = {"name": "exp1", "sites": SITES, "rounds": 3}
    values.update(overrides)
    return ExperimentConfig(**values)


def test_json_round_trip_keeps_every_field() -> None:
    config = make(
        train=TrainConfig(size="tiny", steps=4, lr=0.01),
        strategy="fedprox",
        strategy_kwargs={"mu": 0.05},
        plan="cyclic",
        order="rotating",
        proportional_steps=True,
        site_samples={"site-a": 10, "site-b": 4, "site-c": 6},
        min_sites=2,
        round_timeout_s=120,
        encoding="fp16",
        max_update_norm=50.0,
        seed=7,
    )
    again = ExperimentConfig.from_json(config.to_json())
    assert again == config
    assert again.to_json() == config.to_json()
    assert again.train == TrainConfig(size="tiny", steps=4, lr=0.01)
    # The JSON is canonical, so the stored config.json hashes to the same value everywhere.
    assert config.to_json().encode() == canonical_json(config.to_dict())
    assert (
        hashlib.sha256(config.to_json().encode()).hexdigest()
        == hashlib.sha256(again.to_json().encode()).hexdigest()
    )


def test_defaults_resolve_min_sites_to_every_site() -> None:
    config = make()
    assert config.min_sites == 3
    assert config.strategy == "fedavg" and config.plan == "parallel" and config.encoding == "fp32"


def test_from_dict_refuses_unknown_keys_and_formats() -> None:
    data = make().to_dict()
    with pytest.raises(ValueError, match="unknown experiment config key"):
        ExperimentConfig.from_dict({**data, "round": 3})
    with pytest.raises(ValueError, match="format"):
        ExperimentConfig.from_dict({**data, "format": 99})
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        ExperimentConfig.from_dict({**data, "train": {"epochz": 2}})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"name": "bad name"}, "invalid experiment name"),
        ({"sites": ()}, "sites must be a non-empty"),
        ({"sites": ("site-a", "site-a")}, "duplicate site ids"),
        ({"sites": ("site-a", "global")}, "reserved"),
        ({"rounds": 0}, "rounds must be an integer >= 1"),
        ({"strategy": "fedmagic"}, "unknown strategy 'fedmagic'"),
        ({"strategy": "fedadam", "strategy_kwargs": {"eta": -1.0}}, "eta"),
        ({"strategy": "fedavg", "strategy_kwargs": {"eta": 0.1}}, "strategy 'fedavg'"),
        ({"strategy_kwargs": {"x": float("nan")}}, "JSON values"),
        ({"plan": "ring"}, "plan must be one of"),
        ({"order": "random"}, "order must be one of"),
        ({"min_sites": 4}, "min_sites 4 exceeds the 3 site"),
        ({"min_sites": 0}, "min_sites must be an integer >= 1"),
        ({"encoding": "bf16"}, "encoding must be one of"),
        ({"plan": "cyclic", "encoding": "int8"}, "int8 encoding needs delta"),
        ({"plan": "cyclic", "strategy": "fedadam"}, "would have no effect"),
        ({"proportional_steps": True}, "cyclic plan only"),
        ({"plan": "cyclic", "proportional_steps": True}, "needs train.steps"),
        (
            {"plan": "cyclic", "proportional_steps": True, "train": TrainConfig(steps=3)},
            "needs site_samples for every site",
        ),
        ({"site_samples": {"site-x": 3}}, "not in the experiment"),
        ({"round_timeout_s": 0}, "round_timeout_s"),
        ({"max_update_norm": -1.0}, "max_update_norm"),
        ({"privacy": {"epsilon": 1.0}}, r"privacy: unknown key\(s\) \['epsilon'\]"),
        ({"seed": -1}, "seed"),
        ({"train": {"epochs": 1}}, "train must be a TrainConfig"),
    ],
)
def test_invalid_configs_are_refused_naming_the_experiment(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        make(**overrides)
    if "name" not in overrides:
        assert "exp1" in str(info.value)


def test_make_plan_and_strategy_follow_the_config() -> None:
    parallel = make().make_plan()
    assert isinstance(parallel, ParallelPlan) and parallel.n_steps == 3
    cyclic = make(plan="cyclic", order="rotating", seed=1).make_plan()
    assert isinstance(cyclic, CyclicPlan) and cyclic.n_steps == 9
    assert cyclic.round_order(0) == ("site-b", "site-c", "site-a")
    strategy = make(strategy="fedadam", strategy_kwargs={"eta": 0.02}).make_strategy()
    assert isinstance(strategy, FedAdam) and strategy.eta == 0.02
