from __future__ import annotations

import json

import pytest

from jipfed.federation.plans import (
    CyclicPlan,
    ParallelPlan,
    PlanStep,
    local_steps_for,
    make_plan,
    plan_from_dict,
)

SITES = ("a", "b", "c")


def test_parallel_plan_step_is_a_round() -> None:
    plan = ParallelPlan(sites=SITES, rounds=3)
    assert plan.n_steps == 3
    assert plan.step(2) == PlanStep(step=2, round=2, sites=SITES, hop=None, is_last_in_round=True)
    with pytest.raises(ValueError, match=r"step must be an int in \[0, 3\)"):
        plan.step(3)


def test_cyclic_fixed_order_hops() -> None:
    plan = CyclicPlan(sites=SITES, rounds=2)
    steps = list(plan.steps())
    assert plan.n_steps == 6 and len(steps) == 6
    assert [(s.round, s.hop, s.sites) for s in steps] == [
        (0, 0, ("a",)),
        (0, 1, ("b",)),
        (0, 2, ("c",)),
        (1, 0, ("a",)),
        (1, 1, ("b",)),
        (1, 2, ("c",)),
    ]
    assert [s.is_last_in_round for s in steps] == [False, False, True, False, False, True]


def test_cyclic_rotating_order_moves_the_last_hop() -> None:
    plan = CyclicPlan(sites=SITES, rounds=3, order="rotating")
    assert [plan.round_order(r) for r in range(3)] == [("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b")]
    assert [plan.step(n).sites[0] for n in (2, 5, 8)] == ["c", "a", "b"]  # each site is last once
    seeded = CyclicPlan(sites=SITES, rounds=1, order="rotating", seed=4)
    assert seeded.round_order(0) == ("b", "c", "a")


@pytest.mark.parametrize(
    "plan",
    [ParallelPlan(sites=SITES, rounds=2), CyclicPlan(sites=SITES, rounds=4, order="rotating", seed=1)],
)
def test_plans_round_trip_through_json(plan) -> None:
    again = plan_from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert [s.to_dict() for s in again.steps()] == [s.to_dict() for s in plan.steps()]
    step = plan.step(1)
    assert PlanStep.from_dict(json.loads(json.dumps(step.to_dict()))) == step


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("ring", {"sites": SITES, "rounds": 1}, "unknown plan 'ring'"),
        ("parallel", {"sites": (), "rounds": 1}, "non-empty"),
        ("parallel", {"sites": ("a", "a"), "rounds": 1}, "duplicate"),
        ("parallel", {"sites": ("a/b",), "rounds": 1}, "invalid site id"),
        ("parallel", {"sites": SITES, "rounds": 0}, "rounds must be"),
        ("cyclic", {"sites": SITES, "rounds": 1, "order": "random"}, "order must be"),
        ("cyclic", {"sites": SITES, "rounds": 1, "seed": -1}, "seed must be"),
    ],
)
def test_make_plan_validates(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_plan(name, **kwargs)


def test_plan_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="bad plan arguments"):
        plan_from_dict({"plan": "parallel", "sites": ["a"], "rounds": 1, "order": "fixed"})


def test_local_steps_proportional_to_site_size() -> None:
    sizes = {"a": 10, "b": 30, "c": 20}  # mean 20
    assert [local_steps_for(s, 100, sizes) for s in "abc"] == [50, 150, 100]
    assert local_steps_for("a", 100, sizes, proportional=False) == 100
    assert local_steps_for("a", 1, {"a": 1, "b": 1000}) == 1  # never 0
    with pytest.raises(ValueError, match="site 'd' is not in site_sizes"):
        local_steps_for("d", 100, sizes)
    with pytest.raises(ValueError, match="site_sizes"):
        local_steps_for("a", 100, {"a": 0})
