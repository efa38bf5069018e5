"""FedNova, SCAFFOLD, FedDyn, FedBN and learning-rate schedules, against their papers' formulas by hand."""

from __future__ import annotations

import pytest
import torch

from jipfed.federation.strategies import (
    FedAdam,
    FedAvg,
    FedBN,
    FedDyn,
    FedNova,
    Scaffold,
    Schedule,
    make_strategy,
)
from jipfed.federation.update import ModelUpdate, TensorSpec, control_specs, spec_of
from jipfed.federation.validation import UpdateRejected, check_specs

from ..helpers import t, update


def _with_steps(tensors: dict, *, site: str, round: int, n: int, steps: float) -> ModelUpdate:
    return update(tensors, site=site, round=round, n_samples=n, metrics={"steps": steps})


def test_fednova_normalises_by_local_steps() -> None:
    g = {"w": t(1.0, 2.0), "bn.running_var": t(1.0, 1.0)}
    d_a, d_b = t(0.8, -0.4), t(0.1, 0.3)
    ups = [
        _with_steps({"w": d_a, "bn.running_var": t(0.2, 0.2)}, site="a", round=0, n=4, steps=8),
        _with_steps({"w": d_b, "bn.running_var": t(-0.2, 0.0)}, site="b", round=0, n=1, steps=2),
    ]
    out = FedNova().aggregate(g, ups, round=0)
    p_a, p_b = 0.8, 0.2
    tau_eff = p_a * 8 + p_b * 2
    want = g["w"] + tau_eff * (p_a * d_a / 8 + p_b * d_b / 2)
    assert torch.allclose(out["w"], want, atol=1e-6)
    # buffers: the convex combination with the normalised weights n_i / tau_i (here 1/2, 1/2), no step
    assert torch.allclose(out["bn.running_var"], t(1.0, 1.1), atol=1e-6)


def test_fednova_with_equal_steps_is_fedavg() -> None:
    g = {"w": t(0.5, -1.0)}
    ups = [
        _with_steps({"w": t(1.0, 2.0)}, site="a", round=0, n=3, steps=5),
        _with_steps({"w": t(-1.0, 0.0)}, site="b", round=0, n=1, steps=5),
    ]
    fedavg = FedAvg().aggregate(g, ups, round=0)
    assert torch.allclose(FedNova().aggregate(g, ups, round=0)["w"], fedavg["w"], atol=1e-6)


def test_fednova_needs_the_step_count() -> None:
    g = {"w": t(0.0)}
    with pytest.raises(ValueError, match="site 'site-a' in round 0 reports steps=None"):
        FedNova().aggregate(g, [update({"w": t(1.0)}, round=0)], round=0)


def _scaffold_update(
    site: str, n: int, delta: torch.Tensor, control: torch.Tensor, round: int
) -> ModelUpdate:
    tensors = {"w": delta, "bn.running_mean": torch.zeros(2), "control/w": control}
    return update(tensors, site=site, round=round, n_samples=n)


def test_scaffold_server_step_and_control_update() -> None:
    strategy = Scaffold(server_lr=0.5)
    assert strategy.configure_fit(0) == {"scaffold": True}
    g0 = {"w": t(1.0, 1.0), "bn.running_mean": t(0.0, 0.0)}  # round 0: c = 0, no control tensors yet
    ups = [
        _scaffold_update("a", 3, t(0.4, 0.0), t(1.0, -2.0), 0),
        _scaffold_update("b", 1, t(-0.4, 0.8), t(3.0, 0.0), 0),
    ]
    g1 = strategy.aggregate(g0, ups, round=0)
    assert set(g1) == {"w", "bn.running_mean", "control/w"}
    assert torch.allclose(g1["w"], g0["w"] + 0.5 * t(0.2, 0.2), atol=1e-6)
    assert torch.allclose(g1["control/w"], t(2.0, -1.0))  # c + mean over sites (unweighted)
    ups = [
        _scaffold_update("a", 3, t(0.0, 0.0), t(-1.0, 1.0), 1),
        _scaffold_update("b", 1, t(0.0, 0.0), t(1.0, 1.0), 1),
    ]
    g2 = Scaffold(server_lr=0.5).aggregate(g1, ups, round=1)
    assert torch.equal(g2["w"], g1["w"])
    assert torch.allclose(g2["control/w"], t(2.0, 0.0))


def test_scaffold_refuses_an_update_without_controls() -> None:
    g = {"w": t(1.0)}
    with pytest.raises(ValueError, match="site 'a' in round 0 carries control variates for 0 of 1"):
        Scaffold().aggregate(g, [update({"w": t(0.1)}, site="a", round=0)], round=0)


def test_controls_are_validated_like_any_tensor() -> None:
    model = spec_of({"w": torch.zeros(2, 3), "b": torch.zeros(3), "bn.running_var": torch.zeros(3)})
    controls = control_specs(model)
    assert set(controls) == {"control/w", "control/b"}  # trainable float weights only
    check_specs({**model, **controls}, model, "a", 0, what="payload")  # round 0: derived from the weights
    partial = {**model, "control/w": controls["control/w"]}
    with pytest.raises(UpdateRejected, match="missing"):
        check_specs(partial, model, "a", 0, what="payload")
    wrong = {**model, **controls, "control/b": TensorSpec((4,), "float32")}
    with pytest.raises(UpdateRejected, match="'control/b' has shape"):
        check_specs(wrong, model, "a", 0, what="payload")
    with pytest.raises(UpdateRejected, match="extra"):
        check_specs({**model, **controls, "control/x": controls["control/b"]}, model, "a", 0, what="payload")


def test_feddyn_matches_the_paper_by_hand() -> None:
    alpha = 0.1
    strategy = FedDyn(alpha=alpha)
    assert strategy.configure_fit(3)["feddyn_alpha"] == alpha
    x, h = t(1.0, -1.0), t(0.0, 0.0)
    for r, delta in enumerate((t(0.2, 0.4), t(-0.1, 0.1))):
        out = strategy.aggregate({"w": x}, [update({"w": delta}, round=r)], round=r)
        h = h - alpha * delta
        x = x + delta - h / alpha
        assert torch.allclose(out["w"], x, atol=1e-6)
    rebuilt = make_strategy("feddyn", **strategy.config())
    rebuilt.load_state_dict(strategy.state_dict())
    assert torch.allclose(rebuilt.state_dict().tensors["h/w"], h)


def test_fedbn_sends_its_patterns_and_needs_one() -> None:
    assert FedBN().configure_fit(0)["local_patterns"] == ["*norm*", "*bn*"]
    assert FedBN(local_patterns=["model.0.*"]).config()["local_patterns"] == ["model.0.*"]
    with pytest.raises(ValueError, match="at least one local pattern"):
        FedBN(local_patterns=[])
    assert FedAvg(local_patterns=["*.bn.*"]).configure_fit(1) == {"local_patterns": ["*.bn.*"]}
    assert FedAvg().configure_fit(1) == {} and "local_patterns" not in FedAvg().config()


@pytest.mark.parametrize(
    ("spec", "factors"),
    [
        ({"kind": "constant"}, [1.0, 1.0, 1.0]),
        ({"kind": "cosine", "rounds": 3, "final": 0.2}, [1.0, 0.6, 0.2, 0.2]),
        ({"kind": "linear", "rounds": 5}, [1.0, 0.75, 0.5, 0.25, 0.0]),
        ({"kind": "step", "every": 2, "gamma": 0.5}, [1.0, 1.0, 0.5, 0.5, 0.25]),
        ({"kind": "exp", "gamma": 0.5, "warmup": 1}, [0.5, 0.5, 0.25]),
    ],
)
def test_schedule_factors(spec: dict, factors: list[float]) -> None:
    schedule = Schedule.from_spec(spec)
    assert schedule is not None
    assert [round(schedule.factor(r), 9) for r in range(len(factors))] == factors
    assert Schedule.from_spec(schedule.to_spec()) == schedule


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"kind": "sine"}, "kind in"),
        ({"kind": "cosine"}, "needs \\['rounds'\\]"),
        ({"kind": "step", "every": 0, "gamma": 0.5}, "every must be >= 1"),
        ({"kind": "exp", "gamma": 1.5}, "gamma must be"),
        ({"kind": "exp", "gamma": 0.5, "rounds": 3}, "unknown keys \\['rounds'\\]"),
    ],
)
def test_schedule_errors(spec: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Schedule.from_spec(spec, "server_lr_schedule")


def test_server_and_local_lr_schedules_reach_the_step_and_the_sites() -> None:
    sched = {"kind": "step", "every": 1, "gamma": 0.5}
    fixed, decayed = FedAdam(eta=0.1), FedAdam(eta=0.1, server_lr_schedule=sched, local_lr_schedule=sched)
    assert decayed.configure_fit(2) == {"lr_scale": 0.25}
    g = {"w": t(0.0)}
    for r in range(2):
        a = fixed.aggregate(g, [update({"w": t(0.01)}, round=r)], round=r)["w"]
        b = decayed.aggregate(g, [update({"w": t(0.01)}, round=r)], round=r)["w"]
    assert torch.allclose(b, 0.5 * a)  # round 1: eta x 0.5, same moments
    rebuilt = make_strategy("fedadam", **decayed.config())
    assert rebuilt.config() == decayed.config()
