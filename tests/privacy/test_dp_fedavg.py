"""Client-level DP around FedAvg / FedAdam: clipping, noise, adaptive C, the ledger, the budget, the record."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from federation.helpers import update

from jipfed.federation.strategies import make_strategy
from jipfed.federation.strategies.dp_fedavg import DPFedAvg, PrivacyBudgetExceeded
from jipfed.privacy.accountant import epsilon_after
from jipfed.privacy.settings import ClientDP
from privacy.helpers import record, simulate_two_sites

GLOBAL = {"w": torch.zeros(4), "n": torch.tensor(3)}


def wrapper(rounds: int = 3, **dp: object) -> DPFedAvg:
    settings = {"epsilon": None, "noise_multiplier": 1e-9, "clip_norm": 1.0, **dp}
    return DPFedAvg(inner=make_strategy("fedavg"), dp=ClientDP(**settings), rounds=rounds, n_sites=2)


def two_sites(round_: int = 0) -> list:
    return [
        update(
            {"w": torch.tensor([10.0, 0, 0, 0]), "n": torch.tensor(7)},
            site="site-a",
            round=round_,
            n_samples=90,
        ),
        update(
            {"w": torch.tensor([0, 0.5, 0, 0]), "n": torch.tensor(9)},
            site="site-b",
            round=round_,
            n_samples=10,
        ),
    ]


def test_deltas_are_clipped_and_averaged_with_equal_weight_integers_stay_global() -> None:
    out = wrapper().aggregate(GLOBAL, two_sites(), 0)
    # site-a clipped from 10 to 1; equal weights (sample counts would change the sensitivity)
    assert torch.allclose(out["w"], torch.tensor([0.5, 0.25, 0, 0]), atol=1e-6)
    assert int(out["n"]) == 3


def test_noise_has_std_z_times_c_over_n() -> None:
    big = {"w": torch.zeros(200_000)}
    sites = [update({"w": torch.zeros(200_000)}, site=s, round=0) for s in ("site-a", "site-b")]
    strategy = DPFedAvg(
        inner=make_strategy("fedavg"),
        dp=ClientDP(epsilon=None, noise_multiplier=2.0, clip_norm=0.5),
        rounds=1,
        n_sites=2,
    )
    out = strategy.aggregate(big, sites, 0)
    assert float(out["w"].std()) == pytest.approx(2.0 * 0.5 / 2, rel=0.02)
    assert abs(float(out["w"].mean())) < 0.01


def test_ledger_round_trips_and_a_rerun_reproduces_the_noise() -> None:
    strategy = wrapper(noise_multiplier=1.0)
    strategy.aggregate(GLOBAL, two_sites(0), 0)
    state = strategy.state_dict()
    assert state.meta["privacy"]["releases"] == 1
    assert state.meta["privacy"]["epsilon_total"] == pytest.approx(epsilon_after(1.0, 1, delta=1e-5))
    first, second = wrapper(noise_multiplier=1.0), wrapper(noise_multiplier=1.0)
    first.load_state_dict(state)
    second.load_state_dict(state)
    a, b = first.aggregate(GLOBAL, two_sites(1), 1), second.aggregate(GLOBAL, two_sites(1), 1)
    assert torch.equal(a["w"], b["w"])
    assert first.report()["releases"] == 2
    assert first.report()["epsilon_total"] == pytest.approx(epsilon_after(1.0, 2, delta=1e-5))
    fresh = wrapper(noise_multiplier=1.0)
    assert not torch.equal(fresh.aggregate(GLOBAL, two_sites(1), 1)["w"], a["w"])  # a new key: new noise


def test_budget_stops_the_release_that_would_exceed_it() -> None:
    z = 3.0
    budget = epsilon_after(z, 2, delta=1e-5) + 1e-9
    strategy = wrapper(rounds=2, noise_multiplier=z, epsilon=budget)
    strategy.aggregate(GLOBAL, two_sites(0), 0)
    strategy.aggregate(GLOBAL, two_sites(1), 1)
    with pytest.raises(PrivacyBudgetExceeded, match="release 3 would spend"):
        strategy.aggregate(GLOBAL, two_sites(2), 2)
    with pytest.raises(PrivacyBudgetExceeded, match="3 rounds .* beyond the budget"):
        wrapper(rounds=3, noise_multiplier=z, epsilon=budget)


def test_adaptive_clip_moves_towards_the_target_quantile() -> None:
    strategy = wrapper(noise_multiplier=1e-3, adaptive_clip=True, clip_norm=100.0, clip_lr=0.5)
    for r in range(4):  # every update is far below C: C shrinks geometrically
        strategy.aggregate(GLOBAL, two_sites(r), r)
    assert strategy.clip_norm == pytest.approx(100.0 * torch.e ** (-0.5 * 0.5 * 4), rel=0.01)
    assert strategy.report()["noised_unclipped_fraction"] == pytest.approx(1.0, abs=0.01)


def test_fedadam_steps_on_the_noised_mean() -> None:
    strategy = DPFedAvg(
        inner=make_strategy("fedadam", eta=0.1),
        dp=ClientDP(epsilon=None, noise_multiplier=1e-9, clip_norm=1.0),
        rounds=2,
        n_sites=2,
    )
    out = strategy.aggregate(GLOBAL, two_sites(0), 0)
    assert out["w"][0] > 0 and out["w"][1] > 0 and abs(float(out["w"][2])) < 1e-6


@pytest.mark.slow
def test_simulated_experiment_records_epsilon_in_every_round(tmp_path: Path) -> None:
    result, rounds = simulate_two_sites(tmp_path, "dp1", {"client_dp": {"epsilon": 6.0}})
    records = [record(rounds, r) for r in range(2)]
    z = records[0]["privacy"]["noise_multiplier"]
    assert [r["privacy"]["releases"] for r in records] == [1, 2]
    assert records[1]["privacy"]["epsilon_total"] == pytest.approx(epsilon_after(z, 2, delta=1e-5))
    assert 5.9 <= records[1]["privacy"]["epsilon_total"] <= 6.0
    assert result.history[1].metrics["privacy"]["epsilon_total"] == records[1]["privacy"]["epsilon_total"]


def test_the_updates_are_never_modified() -> None:
    sites = two_sites()
    before = [u.tensors["w"].clone() for u in sites]
    wrapper().aggregate(GLOBAL, sites, 0)
    assert all(torch.equal(u.tensors["w"], b) for u, b in zip(sites, before, strict=True))
