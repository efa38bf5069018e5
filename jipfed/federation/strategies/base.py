"""The strategy interface the central calls, and the persistable server state.

A strategy says what each site gets for a round (:meth:`Strategy.configure_fit`, e.g. FedProx's
``mu``) and turns the round's global weights plus the sites' validated updates into the next global
weights (:meth:`Strategy.aggregate`). The maths lives in :mod:`jipfed.federation.aggregate`.

Server state (FedAvgM's momentum, FedOpt's moments) round-trips through :class:`StrategyState`:
tensors as safetensors bytes plus JSON, so the central can keep it in the model store next to the
global model and resume a crashed experiment with identical results.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import safetensors.torch
import torch
from safetensors import SafetensorError

from jipfed.federation.update import UpdateSource
from jipfed.storage.layout import validate_round

STATE_VERSION = 1
_ACCUMULATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True, eq=False, kw_only=True)
class StrategyState:
    """What :meth:`Strategy.state_dict` returns: registry name, constructor config, JSON meta, tensors."""

    strategy: str
    config: Mapping[str, Any]
    meta: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, str) or not self.strategy:
            raise ValueError(f"strategy must be a non-empty name, got {self.strategy!r}")
        for what in ("config", "meta"):
            value = getattr(self, what)
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"state {what} must be JSON-serialisable: {exc}") from None
            object.__setattr__(self, what, MappingProxyType(dict(value)))
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    def to_payload(self) -> tuple[bytes, str]:
        """(safetensors bytes of the tensors, JSON with strategy, config, meta and the bytes' sha256)."""
        payload = safetensors.torch.save({k: v.contiguous() for k, v in self.tensors.items()})
        text = json.dumps(
            {
                "version": STATE_VERSION,
                "strategy": self.strategy,
                "config": dict(self.config),
                "meta": dict(self.meta),
                "sha256": hashlib.sha256(payload).hexdigest(),
            },
            sort_keys=True,
            allow_nan=False,
        )
        return payload, text

    @classmethod
    def from_payload(cls, payload: bytes, text: str | bytes) -> StrategyState:
        """Inverse of :meth:`to_payload`; ValueError on a hash mismatch or malformed input."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"strategy state JSON is invalid: {exc}") from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ValueError(f"strategy state JSON must be an object with version {STATE_VERSION}")
        if hashlib.sha256(payload).hexdigest() != data.get("sha256"):
            raise ValueError("strategy state payload does not match its sha256")
        try:
            tensors = safetensors.torch.load(payload)
        except SafetensorError as exc:
            raise ValueError(f"strategy state payload is not safetensors: {exc}") from None
        return cls(strategy=data["strategy"], config=data["config"], meta=data["meta"], tensors=tensors)


def check_float(
    value: Any,
    what: str,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as float if finite and within the bounds, else ValueError naming ``what`` and ``value``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{what} must be a finite number in {lo}{low}, {high}{hi}, got {value!r}")
    return float(value)


def accumulate_dtype_of(name: str | None) -> torch.dtype | None:
    """``None`` / ``"float32"`` / ``"float64"`` -> torch dtype; ValueError otherwise."""
    if name is None:
        return None
    if name not in _ACCUMULATE_DTYPES:
        raise ValueError(f"accumulate_dtype must be None, 'float32' or 'float64', got {name!r}")
    return _ACCUMULATE_DTYPES[name]


def checked_updates(updates: Iterable[UpdateSource], round: int) -> Iterator[UpdateSource]:
    """Yield ``updates`` lazily, raising ValueError on a stale round, a duplicate site or none at all."""
    sites: set[str] = set()
    for update in updates:
        manifest = update.manifest
        if manifest.round != round:
            raise ValueError(
                f"update from site {manifest.site!r} is for round {manifest.round}, aggregating {round}"
            )
        if manifest.site in sites:
            raise ValueError(f"duplicate update from site {manifest.site!r} in round {round}")
        sites.add(manifest.site)
        yield update
    if not sites:
        raise ValueError(f"no updates to aggregate in round {round}")


class Strategy(ABC):
    """Base of all strategies. Subclasses set ``name`` and take keyword-only, validated arguments."""

    name: ClassVar[str]

    def configure_fit(self, round: int) -> dict[str, Any]:
        """JSON-serialisable settings each site trains round ``round`` with (kwargs of the trainer)."""
        validate_round(round)
        return {}

    @abstractmethod
    def aggregate(
        self, global_weights: Mapping[str, torch.Tensor], updates: Iterable[UpdateSource], round: int
    ) -> dict[str, torch.Tensor]:
        """New global weights from ``global_weights`` (of ``round``) and the sites' updates of ``round``."""

    def aggregate_streamed(
        self,
        global_weights: Mapping[str, torch.Tensor],
        updates: Iterable[UpdateSource],
        round: int,
        on_tensor: Callable[[str, torch.Tensor], None],
    ) -> dict[str, torch.Tensor]:
        """:meth:`aggregate`, calling ``on_tensor(name, tensor)`` for result tensors that are final early.

        The caller handles the tensors not passed to ``on_tensor`` from the returned result. By
        default none is (the result is only final once :meth:`aggregate` returns); a strategy
        whose tensors are final one by one overrides this (the output is written meanwhile).
        """
        return self.aggregate(global_weights, updates, round)

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor arguments as JSON (``make_strategy(name, **config)`` rebuilds the strategy)."""

    def report(self) -> dict[str, Any]:
        """JSON facts about the last aggregation for the round record (e.g. ε spent); ``{}`` = none."""
        return {}

    def state_dict(self) -> StrategyState:
        """Server state to persist; stateless strategies have empty meta and tensors."""
        return StrategyState(strategy=self.name, config=self.config())

    def load_state_dict(self, state: StrategyState) -> None:
        """Restore :meth:`state_dict` output; ValueError if it belongs to another strategy or config."""
        if state.strategy != self.name:
            raise ValueError(f"state is for strategy {state.strategy!r}, this is {self.name!r}")
        if dict(state.config) != self.config():
            raise ValueError(
                f"state config {dict(state.config)} differs from this strategy's {self.config()}"
            )
        self._load_state(state)

    def _load_state(self, state: StrategyState) -> None:
        if state.meta or state.tensors:
            raise ValueError(
                f"strategy {self.name!r} is stateless, got meta {dict(state.meta)} / {len(state.tensors)} tensors"
            )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"
