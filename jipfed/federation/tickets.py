"""The protocol's light vocabulary: the step ticket sites receive and the protocol's exceptions.

No torch here: the light tasks (which parse a work item) and the central endpoint's routing import
this module in an Airflow without the worker stack. :mod:`jipfed.federation.rounds` holds the actions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from jipfed.federation.experiment import ExperimentConfig
from jipfed.storage.base import canonical_json
from jipfed.storage.state import ExperimentStore


class ProtocolError(Exception):
    """An action does not fit the experiment's current state (wrong step, not running, ...)."""


class UpdateRefused(ProtocolError):
    """``accept_update`` refused an upload; nothing was stored.

    Attributes:
        experiment, site, round: what the upload claimed to be.
        code: ``"late"`` (round closed), ``"wrong_round"``, ``"not_selected"``, ``"duplicate"``,
            ``"not_running"`` or ``"rejected"`` (the codec's validation failed).
        reason: one line saying why.
    """

    def __init__(self, experiment: str, site: str, round: int, code: str, reason: str) -> None:
        self.experiment = experiment
        self.site = site
        self.round = round
        self.code = code
        self.reason = reason
        super().__init__(
            f"experiment {experiment!r}: update from site {site!r} for round {round} refused: {reason}"
        )


class QuorumNotMet(ProtocolError):
    """Too few valid updates to aggregate a step; the global model and the state are untouched."""

    def __init__(
        self,
        experiment: str,
        step: int,
        round: int,
        required: int,
        included: Sequence[str],
        rejected: Mapping[str, str],
        missing: Sequence[str],
        missing_reasons: Mapping[str, str] | None = None,
    ) -> None:
        self.experiment = experiment
        self.step = step
        self.round = round
        self.required = required
        self.included = tuple(included)
        self.rejected = dict(rejected)
        self.missing = tuple(missing)
        self.missing_reasons = dict(missing_reasons or {})
        super().__init__(
            f"experiment {experiment!r}, round {round} (step {step}): quorum not met: {len(self.included)} "
            f"valid update(s) {list(self.included)}, {required} required; missing "
            f"{self.missing_reasons or list(self.missing)}, rejected {self.rejected}"
        )


@dataclass(frozen=True)
class StepTicket:
    """What the central sends out for one step: who trains, from which model, with which settings.

    Attributes:
        experiment, config_hash: the experiment and the sha256 of its config.
        step, round, hop: the plan step (``hop`` None for parallel steps).
        sites: sites that train in this step.
        is_last_in_round: the step's result is the next round's global model.
        kind: what sites send back: ``"delta"`` (parallel) or ``"weights"`` (cyclic).
        encoding: wire encoding of updates.
        model_key, manifest_key: store keys of the model to start from and its manifest.
        model_sha256: sha256 of that model's payload; sites verify it before use.
        fit_config: strategy settings for the site's trainer (e.g. ``{"mu": 0.01}``).
        local_work: site → ``{"epochs": n}`` or ``{"steps": n}``.
        timeout_s: how long the central waits for the step's updates.
    """

    experiment: str
    config_hash: str
    step: int
    round: int
    hop: int | None
    sites: tuple[str, ...]
    is_last_in_round: bool
    kind: str
    encoding: str
    model_key: str
    manifest_key: str
    model_sha256: str
    fit_config: Mapping[str, Any] = field(default_factory=dict)
    local_work: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", tuple(self.sites))
        object.__setattr__(self, "fit_config", MappingProxyType(dict(self.fit_config)))
        work = {site: MappingProxyType(dict(w)) for site, w in self.local_work.items()}
        object.__setattr__(self, "local_work", MappingProxyType(work))

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "config_hash": self.config_hash,
            "step": self.step,
            "round": self.round,
            "hop": self.hop,
            "sites": list(self.sites),
            "is_last_in_round": self.is_last_in_round,
            "kind": self.kind,
            "encoding": self.encoding,
            "model_key": self.model_key,
            "manifest_key": self.manifest_key,
            "model_sha256": self.model_sha256,
            "fit_config": dict(self.fit_config),
            "local_work": {site: dict(w) for site, w in self.local_work.items()},
            "timeout_s": self.timeout_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepTicket:
        if not isinstance(data, Mapping):
            raise ValueError(f"step ticket must be a JSON object, got {type(data).__name__}")
        names = set(cls.__dataclass_fields__)
        unknown, missing = sorted(set(data) - names), sorted(names - set(data))
        if unknown or missing:
            raise ValueError(f"step ticket keys: unknown {unknown}, missing {missing}")
        return cls(**{k: tuple(v) if k == "sites" else v for k, v in data.items()})

    def to_json(self) -> str:
        return canonical_json(self.to_dict()).decode("utf-8")

    @classmethod
    def from_json(cls, text: str | bytes) -> StepTicket:
        return cls.from_dict(json.loads(text))


def load_config(exp_store: ExperimentStore) -> tuple[ExperimentConfig, str]:
    """The stored experiment config and its sha256."""
    config = ExperimentConfig.from_dict(exp_store.load_config())
    return config, exp_store.config_hash()
