from __future__ import annotations

import pytest
import torch

from jipfed.federation.strategies import FedAvg, FedAvgM, StrategyState, strategy_from_state

from ..helpers import t, update


def _round(strategy: FedAvgM, g: dict, round: int, *deltas: torch.Tensor) -> dict:
    ups = [update({"w": d, "n": torch.tensor(1)}, site=f"s{i}", round=round) for i, d in enumerate(deltas)]
    return strategy.aggregate(g, ups, round=round)


def test_fedavgm_two_rounds_by_hand() -> None:
    s = FedAvgM(server_lr=2.0, momentum=0.5)
    g0 = {"w": t(0, 0), "n": torch.tensor(0)}
    g1 = _round(s, g0, 1, t(1, 2), t(3, 2))  # delta [2, 2]; v = [2, 2]; x = 0 + 2 * v
    assert torch.equal(g1["w"], t(4, 4))
    assert torch.equal(g1["n"], torch.tensor(1))
    g2 = _round(s, g1, 2, t(0, 1), t(2, -1))  # delta [1, 0]; v = 0.5 * [2, 2] + [1, 0] = [2, 1]
    assert torch.equal(g2["w"], t(8, 6))


def test_fedavgm_without_momentum_is_fedavg() -> None:
    g = {"w": t(1, 1), "n": torch.tensor(0)}
    ups = [
        update({"w": t(1, 2), "n": torch.tensor(1)}, site="a", n_samples=1),
        update({"w": t(3, 0), "n": torch.tensor(1)}, site="b", n_samples=3),
    ]
    assert torch.equal(FedAvgM(momentum=0.0).aggregate(g, ups, 1)["w"], FedAvg().aggregate(g, ups, 1)["w"])


def test_fedavgm_resume_from_state_is_identical() -> None:
    g0 = {"w": t(0.3, -0.7), "n": torch.tensor(0)}
    a = FedAvgM(server_lr=0.7, momentum=0.9)
    g1 = _round(a, g0, 1, t(0.1, 0.2), t(-0.3, 0.05))
    payload, text = a.state_dict().to_payload()
    b = strategy_from_state(StrategyState.from_payload(payload, text))
    for r in (2, 3):
        ga = _round(a, g1, r, t(0.2, -0.1), t(0.01, 0.3))
        gb = _round(b, g1, r, t(0.2, -0.1), t(0.01, 0.3))
        assert torch.equal(ga["w"], gb["w"])
        g1 = ga
    with pytest.raises(ValueError, match="not after the last aggregated round 3"):
        _round(b, g1, 3, t(0, 0))


def test_fedavgm_validates_arguments() -> None:
    with pytest.raises(ValueError, match="momentum"):
        FedAvgM(momentum=1.0)
    with pytest.raises(ValueError, match="eta"):
        FedAvgM(server_lr=0.0)
    assert FedAvgM(server_lr=0.5).config() == {
        "server_lr": 0.5,
        "momentum": 0.9,
        "accumulate_dtype": None,
        "integer_mode": "max",
    }
