"""FedAdagrad, FedAdam, FedYogi against Reddi et al. (2021) Algorithm 2, computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from jipfed.federation.strategies import FedAdagrad, FedAdam, FedYogi, StrategyState, strategy_from_state
from jipfed.federation.strategies.fedopt import FedOpt

from ..helpers import t, update


def _round(strategy: FedOpt, g: dict, round: int, delta: torch.Tensor) -> dict:
    return strategy.aggregate(g, [update({"w": delta, "n": torch.tensor(1)}, round=round)], round=round)


def _expected(
    kind: str, eta: float, b1: float, b2: float, tau: float, deltas: list[list[float]]
) -> list[list[float]]:
    """Pure-Python Algorithm 2 for one-site rounds starting at x = 0."""
    x = [0.0, 0.0]
    m = [0.0, 0.0]
    v = [tau**2, tau**2]
    out = []
    for d in deltas:
        for i in range(2):
            m[i] = b1 * m[i] + (1 - b1) * d[i]
            if kind == "adagrad":
                v[i] = v[i] + d[i] ** 2
            elif kind == "adam":
                v[i] = b2 * v[i] + (1 - b2) * d[i] ** 2
            else:
                v[i] = v[i] - (1 - b2) * d[i] ** 2 * math.copysign(1.0, v[i] - d[i] ** 2)
            x[i] = x[i] + eta * m[i] / (math.sqrt(v[i]) + tau)
        out.append(list(x))
    return out


@pytest.mark.parametrize(
    ("kind", "make"),
    [
        ("adagrad", lambda: FedAdagrad(eta=0.5, beta1=0.5, tau=0.1, accumulate_dtype="float64")),
        ("adam", lambda: FedAdam(eta=0.5, beta1=0.5, beta2=0.75, tau=0.1, accumulate_dtype="float64")),
        ("yogi", lambda: FedYogi(eta=0.5, beta1=0.5, beta2=0.75, tau=0.1, accumulate_dtype="float64")),
    ],
)
def test_two_rounds_match_algorithm_2(kind: str, make) -> None:
    # round 2's small delta makes v > delta^2, exercising Yogi's other sign branch
    deltas = [[2.0, -1.0], [0.1, 0.5]]
    strategy = make()
    b2 = getattr(strategy, "beta2", 0.0)
    want = _expected(kind, 0.5, 0.5, b2, 0.1, deltas)
    g = {"w": torch.zeros(2, dtype=torch.float64), "n": torch.tensor(0)}
    for r, d in enumerate(deltas, start=1):
        g = _round(strategy, g, r, torch.tensor(d, dtype=torch.float64))
        assert torch.allclose(g["w"], torch.tensor(want[r - 1], dtype=torch.float64), rtol=1e-12, atol=1e-12)
        assert torch.equal(g["n"], torch.tensor(r))  # integer buffer: global + delta, no server step


def test_first_step_by_hand_fedadam() -> None:
    # m = 0.5 * 2 = 1; v = 0.75 * 0.01 + 0.25 * 4 = 1.0075; x = 0.5 * 1 / (sqrt(1.0075) + 0.1)
    g = _round(
        FedAdam(eta=0.5, beta1=0.5, beta2=0.75, tau=0.1), {"w": t(0, 0), "n": torch.tensor(0)}, 1, t(2, 0)
    )
    assert float(g["w"][0]) == pytest.approx(0.5 / (math.sqrt(1.0075) + 0.1), rel=1e-6)
    assert float(g["w"][1]) == 0.0


@pytest.mark.parametrize("cls", [FedAdagrad, FedAdam, FedYogi])
def test_resume_from_state_gives_identical_results(cls: type[FedOpt]) -> None:
    gen = torch.Generator().manual_seed(3)
    deltas = [torch.randn(2, generator=gen) * 0.1 for _ in range(3)]
    g0 = {"w": t(0.5, -0.5), "n": torch.tensor(0)}
    a = cls(eta=0.05)
    g1 = _round(a, g0, 1, deltas[0])
    state = a.state_dict()
    assert sorted(state.tensors) == ["m/w", "v/w"] and state.meta == {"steps": 1, "last_round": 1}
    b = strategy_from_state(StrategyState.from_payload(*state.to_payload()))
    without_state = _round(cls(eta=0.05), g1, 2, deltas[1])
    ga, gb = g1, g1
    for r in (2, 3):
        ga, gb = _round(a, ga, r, deltas[r - 1]), _round(b, gb, r, deltas[r - 1])
        assert torch.equal(ga["w"], gb["w"])
        if r == 2:  # the state matters: a fresh strategy's round 2 differs
            assert not torch.allclose(ga["w"], without_state["w"])


def test_state_is_checked_on_load() -> None:
    a = FedAdam(eta=0.05)
    _round(a, {"w": t(0, 0), "n": torch.tensor(0)}, 1, t(1, 1))
    payload, text = a.state_dict().to_payload()
    with pytest.raises(ValueError, match="config"):
        FedAdam(eta=0.1).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="strategy 'fedadam'"):
        FedYogi(eta=0.05).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="sha256"):
        StrategyState.from_payload(payload + b" ", text)
    bad = StrategyState(
        strategy="fedadam", config=a.config(), meta={"steps": 1, "last_round": 1}, tensors={"q/w": t(1)}
    )
    with pytest.raises(ValueError, match="unexpected state tensor 'q/w'"):
        FedAdam(eta=0.05).load_state_dict(bad)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: FedAdam(eta=-1.0), "eta"),
        (lambda: FedAdam(beta1=1.0), "beta1"),
        (lambda: FedYogi(beta2=-0.1), "beta2"),
        (lambda: FedAdagrad(tau=0.0), "tau"),
        (lambda: FedAdam(eta=float("nan")), "eta"),
    ],
)
def test_arguments_are_validated(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
