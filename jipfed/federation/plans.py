"""Compute plans: which sites train in which step. One central DAG run executes one step.

* :class:`ParallelPlan` (FedAvg family): step ``n`` is round ``n``; every site trains from the same
  global model and the central aggregates their updates.
* :class:`CyclicPlan` (cyclic weight transfer; Chang et al., "Distributed deep learning networks
  among institutions for medical imaging", JAMIA 2018): step ``n`` is one hop; one site trains from
  the model the previous hop produced; a round is one pass over all sites.

Steps and rounds count from 0. Plans are frozen, validated when built and round-trip through JSON
(:meth:`Plan.to_dict` / :func:`plan_from_dict`) so they can live in the experiment config.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

from jipfed.storage.layout import validate_slug

ORDERS = ("fixed", "rotating")


def _check_int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


def _check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be a boolean, got {value!r}")
    return value


def _check_sites(sites: Sequence[str]) -> tuple[str, ...]:
    if isinstance(sites, str) or not isinstance(sites, Sequence) or not sites:
        raise ValueError(f"sites must be a non-empty sequence of site ids, got {sites!r}")
    for site in sites:
        validate_slug(site, "site id")
    if len(set(sites)) != len(sites):
        raise ValueError(f"duplicate site ids in {list(sites)}")
    return tuple(sites)


@dataclass(frozen=True, kw_only=True)
class PlanStep:
    """One step of a plan.

    Attributes:
        step: step number (0-based; one central DAG run).
        round: round the step belongs to.
        sites: sites that train in this step (all for parallel, one for a cyclic hop).
        hop: position of the hop within its round (cyclic), None for parallel steps.
        is_last_in_round: True when the round's global model is final after this step.
    """

    step: int
    round: int
    sites: tuple[str, ...]
    hop: int | None
    is_last_in_round: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "round": self.round,
            "sites": list(self.sites),
            "hop": self.hop,
            "is_last_in_round": self.is_last_in_round,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanStep:
        keys = {"step", "round", "sites", "hop", "is_last_in_round"}
        if not isinstance(data, Mapping) or set(data) != keys:
            raise ValueError(f"plan step must be an object with keys {sorted(keys)}, got {data!r}")
        return cls(
            step=_check_int(data["step"], "step", 0),
            round=_check_int(data["round"], "round", 0),
            sites=_check_sites(data["sites"]),
            hop=None if data["hop"] is None else _check_int(data["hop"], "hop", 0),
            is_last_in_round=_check_bool(data["is_last_in_round"], "is_last_in_round"),
        )


class Plan(ABC):
    """A compute plan: ``n_steps`` steps, each described by :meth:`step`."""

    name: ClassVar[str]
    sites: tuple[str, ...]
    rounds: int

    @property
    @abstractmethod
    def n_steps(self) -> int:
        """Total number of steps (central DAG runs)."""

    @abstractmethod
    def step(self, n: int) -> PlanStep:
        """Step ``n`` (0 <= n < n_steps); ValueError otherwise."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict with a ``"plan"`` key naming the plan (see :func:`plan_from_dict`)."""

    def steps(self) -> Iterator[PlanStep]:
        """All steps in order."""
        return (self.step(n) for n in range(self.n_steps))

    def _check_step(self, n: int) -> int:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < self.n_steps:
            raise ValueError(f"step must be an int in [0, {self.n_steps}), got {n!r}")
        return n


@dataclass(frozen=True, kw_only=True)
class ParallelPlan(Plan):
    """Step n = round n: every site trains from round n's global model."""

    name: ClassVar[str] = "parallel"
    sites: tuple[str, ...]
    rounds: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", _check_sites(self.sites))
        _check_int(self.rounds, "rounds", 1)

    @property
    def n_steps(self) -> int:
        return self.rounds

    def step(self, n: int) -> PlanStep:
        n = self._check_step(n)
        return PlanStep(step=n, round=n, sites=self.sites, hop=None, is_last_in_round=True)

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.name, "sites": list(self.sites), "rounds": self.rounds}


@dataclass(frozen=True, kw_only=True)
class CyclicPlan(Plan):
    """One hop per step; round r visits every site once.

    Args:
        sites: site ids in plan order.
        rounds: passes over all sites (>= 1).
        order: ``"fixed"``: the same order every round; ``"rotating"``: round r starts at site
            ``(r + seed) mod n_sites``, so every site is in turn the last (most influential) hop.
        seed: offset of the rotation (int >= 0); has no effect with ``"fixed"``.
    """

    name: ClassVar[str] = "cyclic"
    sites: tuple[str, ...]
    rounds: int
    order: str = "fixed"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", _check_sites(self.sites))
        _check_int(self.rounds, "rounds", 1)
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        _check_int(self.seed, "seed", 0)

    @property
    def n_steps(self) -> int:
        return self.rounds * len(self.sites)

    def round_order(self, round: int) -> tuple[str, ...]:
        """Sites in the order they train in ``round``."""
        _check_int(round, "round", 0)
        if self.order == "fixed":
            return self.sites
        shift = (round + self.seed) % len(self.sites)
        return self.sites[shift:] + self.sites[:shift]

    def step(self, n: int) -> PlanStep:
        n = self._check_step(n)
        round_, hop = divmod(n, len(self.sites))
        site = self.round_order(round_)[hop]
        return PlanStep(
            step=n, round=round_, sites=(site,), hop=hop, is_last_in_round=hop == len(self.sites) - 1
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.name,
            "sites": list(self.sites),
            "rounds": self.rounds,
            "order": self.order,
            "seed": self.seed,
        }


PLANS: Mapping[str, type[Plan]] = MappingProxyType(
    {ParallelPlan.name: ParallelPlan, CyclicPlan.name: CyclicPlan}
)


def make_plan(name: str, **kwargs: Any) -> Plan:
    """The plan registered as ``name`` (``"parallel"`` or ``"cyclic"``) built with ``kwargs``."""
    if name not in PLANS:
        raise ValueError(f"unknown plan {name!r}; known: {sorted(PLANS)}")
    if "sites" in kwargs and isinstance(kwargs["sites"], list):
        kwargs["sites"] = tuple(kwargs["sites"])
    return PLANS[name](**kwargs)


def plan_from_dict(data: Mapping[str, Any]) -> Plan:
    """Inverse of :meth:`Plan.to_dict`; ValueError on an unknown plan or bad values."""
    if not isinstance(data, Mapping) or "plan" not in data:
        raise ValueError(f"plan must be an object with a 'plan' key, got {data!r}")
    kwargs = dict(data)
    try:
        return make_plan(kwargs.pop("plan"), **kwargs)
    except TypeError as exc:
        raise ValueError(f"bad plan arguments {sorted(kwargs)}: {exc}") from None


def local_steps_for(
    site: str, base_steps: int, site_sizes: Mapping[str, int], *, proportional: bool = True
) -> int:
    """Local optimiser steps for ``site``.

    ``proportional=False`` gives ``base_steps``. Otherwise ``round(base_steps * size / mean size)``
    (at least 1): a site with an average number of cases takes ``base_steps``, and the total over
    sites stays about ``base_steps * n_sites`` while each case is seen about equally often.
    """
    _check_int(base_steps, "base_steps", 1)
    if not isinstance(site_sizes, Mapping) or site not in site_sizes:
        raise ValueError(
            f"site {site!r} is not in site_sizes {sorted(site_sizes) if isinstance(site_sizes, Mapping) else site_sizes!r}"
        )
    for name, size in site_sizes.items():
        _check_int(size, f"site_sizes[{name!r}]", 1)
    if not proportional:
        return base_steps
    mean = sum(site_sizes.values()) / len(site_sizes)
    return max(1, math.floor(base_steps * site_sizes[site] / mean + 0.5))
