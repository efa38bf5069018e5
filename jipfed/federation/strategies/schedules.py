"""Learning-rate schedules across rounds: a factor per round that scales a server or local learning rate.

A schedule is given as JSON, e.g. ``{"kind": "cosine", "rounds": 40, "final": 0.1}``:

- ``constant``: 1 every round;
- ``cosine``: from 1 at round 0 to ``final`` at round ``rounds - 1`` (then ``final``);
- ``linear``: the same path as a straight line;
- ``step``: multiplied by ``gamma`` every ``every`` rounds;
- ``exp``: ``gamma ** round``.

Every kind accepts ``warmup`` (rounds of linear warm-up from ``1 / (warmup + 1)``, default 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from jipfed.federation.strategies.base import check_float
from jipfed.storage.layout import validate_round

SCHEDULE_KINDS = ("constant", "cosine", "linear", "step", "exp")
_KEYS = {
    "constant": set(),
    "cosine": {"rounds", "final"},
    "linear": {"rounds", "final"},
    "step": {"every", "gamma"},
    "exp": {"gamma"},
}


def _check_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class Schedule:
    """A validated schedule; :meth:`factor` is the multiplier of round ``round``."""

    kind: str = "constant"
    rounds: int = 1
    final: float = 0.0
    every: int = 1
    gamma: float = 1.0
    warmup: int = 0

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None, what: str = "schedule") -> Schedule | None:
        """None for None; else the schedule ``spec`` describes, ValueError naming ``what`` otherwise."""
        if spec is None:
            return None
        if not isinstance(spec, Mapping) or spec.get("kind") not in SCHEDULE_KINDS:
            raise ValueError(f"{what} must be an object with kind in {SCHEDULE_KINDS}, got {spec!r}")
        kind = spec["kind"]
        unknown = sorted(set(spec) - {"kind", "warmup"} - _KEYS[kind])
        if unknown:
            raise ValueError(
                f"{what}: unknown keys {unknown} for kind {kind!r} (known: {sorted(_KEYS[kind])})"
            )
        missing = sorted((_KEYS[kind] - {"final"}) - set(spec))
        if missing:
            raise ValueError(f"{what}: kind {kind!r} needs {missing}")
        out = cls(kind=kind, warmup=_check_int(spec.get("warmup", 0), f"{what}: warmup"))
        if kind in ("cosine", "linear"):
            rounds = _check_int(spec["rounds"], f"{what}: rounds")
            if rounds < 1:
                raise ValueError(f"{what}: rounds must be >= 1, got {rounds}")
            final = check_float(spec.get("final", 0.0), f"{what}: final", low=0.0, high=1.0)
            out = cls(kind=kind, rounds=rounds, final=final, warmup=out.warmup)
        elif kind == "step":
            every = _check_int(spec["every"], f"{what}: every")
            if every < 1:
                raise ValueError(f"{what}: every must be >= 1, got {every}")
            gamma = check_float(spec["gamma"], f"{what}: gamma", low=0.0, high=1.0, low_open=True)
            out = cls(kind=kind, every=every, gamma=gamma, warmup=out.warmup)
        elif kind == "exp":
            gamma = check_float(spec["gamma"], f"{what}: gamma", low=0.0, high=1.0, low_open=True)
            out = cls(kind=kind, gamma=gamma, warmup=out.warmup)
        return out

    def to_spec(self) -> dict[str, Any]:
        """The JSON spec :meth:`from_spec` rebuilds this schedule from (only the keys its kind uses)."""
        data = asdict(self)
        keep = {"kind", "warmup"} | _KEYS[self.kind]
        return {k: v for k, v in data.items() if k in keep and (k != "warmup" or v)}

    def factor(self, round: int) -> float:
        """Multiplier of round ``round`` (0-based)."""
        validate_round(round)
        value = 1.0
        if self.kind in ("cosine", "linear"):
            t = min(1.0, round / max(1, self.rounds - 1))
            shape = 0.5 * (1.0 + math.cos(math.pi * t)) if self.kind == "cosine" else 1.0 - t
            value = self.final + (1.0 - self.final) * shape
        elif self.kind == "step":
            value = self.gamma ** (round // self.every)
        elif self.kind == "exp":
            value = self.gamma**round
        if round < self.warmup:
            value *= (round + 1) / (self.warmup + 1)
        return value
