"""``LineConfig``: what a model line is (sites, training settings, schedule, replay, release rule).

A line is stored as JSON (``lines/<name>/line.json`` in the central store) and validated when
built: a ValueError names the line and the bad field. :data:`LINE_SCHEMA` is the same contract as
a JSON Schema, for forms (Airflow Params / Variables) and editors.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from croniter import croniter

from jipfed.federation.experiment import ExperimentConfig
from jipfed.lines.rule import ReleaseRule, finite_number
from jipfed.storage.layout import validate_slug

LINE_FORMAT = 1
DEFAULT_SCHEDULE = "0 2 * * *"
#: Experiment settings a line may set; name, sites, rounds and case selection come from the line.
EXPERIMENT_KEYS = (
    "train",
    "strategy",
    "strategy_kwargs",
    "min_sites",
    "round_timeout_s",
    "encoding",
    "seed",
    "in_channels",
    "datasets",
    "transport",
)


@dataclass(frozen=True)
class LineConfig:
    """A model line.

    Attributes:
        name: line name (slug); its versions are ``<name>`` v1, v2, ...
        sites: participating site ids.
        experiment: settings of each run's federated experiment (keys of :data:`EXPERIMENT_KEYS`;
            ``train`` is a :class:`~jipfed.training.config.TrainConfig` dict).
        rounds: rounds of each run's experiment (short: it starts from the released model).
        schedule: cron expression (UTC) of the line's runs; default nightly at 02:00.
        replay: older cases each site adds to its new ones, drawn at random (0 = none).
        rule: the release rule.
        evaluation_timeout_s: how long a run waits for the sites' scores.
        census_timeout_s: how long a run waits for the sites' new-case counts.
        paused: a paused line is never due.
    """

    name: str
    sites: tuple[str, ...]
    experiment: Mapping[str, Any] = field(default_factory=dict)
    rounds: int = 1
    schedule: str = DEFAULT_SCHEDULE
    replay: int = 4
    rule: ReleaseRule = field(default_factory=ReleaseRule)
    evaluation_timeout_s: float = 3600.0
    census_timeout_s: float = 3600.0
    paused: bool = False

    def __post_init__(self) -> None:
        validate_slug(self.name, "line name")
        where = f"line {self.name!r}"
        privacy = self.experiment.get("privacy")
        if isinstance(privacy, Mapping) and privacy.get("secure_aggregation"):
            raise ValueError(
                f"{where}: secure aggregation is refused for a line: a line's census and model card report "
                "each site's case counts and a run's record the cases each site trained on, which secure "
                "aggregation hides in the masked sum (a line would reveal what it protects)"
            )
        unknown = sorted(set(self.experiment) - set(EXPERIMENT_KEYS))
        if unknown:
            raise ValueError(
                f"{where}: experiment keys {unknown} are not line settings; use {list(EXPERIMENT_KEYS)}"
            )
        object.__setattr__(
            self, "sites", tuple(self.sites) if isinstance(self.sites, (list, tuple)) else self.sites
        )
        object.__setattr__(self, "experiment", json.loads(json.dumps(dict(self.experiment))))
        if not isinstance(self.schedule, str) or not croniter.is_valid(self.schedule):
            raise ValueError(f"{where}: schedule must be a cron expression, got {self.schedule!r}")
        if isinstance(self.replay, bool) or not isinstance(self.replay, int) or self.replay < 0:
            raise ValueError(f"{where}: replay must be an integer >= 0, got {self.replay!r}")
        for what in ("evaluation_timeout_s", "census_timeout_s"):
            value = finite_number(getattr(self, what), f"{where}: {what}", minimum=0.0, strict=True)
            object.__setattr__(self, what, value)
        if not isinstance(self.paused, bool):
            raise ValueError(f"{where}: paused must be a boolean, got {self.paused!r}")
        if not isinstance(self.rule, ReleaseRule):
            raise ValueError(f"{where}: rule must be a ReleaseRule, got {type(self.rule).__name__}")
        if self.experiment.get("transport", "pull") != "pull":
            raise ValueError(
                f"{where}: a line's runs use the pull transport (the sites poll), got {self.experiment['transport']!r}"
            )
        try:
            self.experiment_config(f"{self.name}-check")
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def experiment_config(
        self,
        experiment: str,
        case_selection: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        sites: list[str] | None = None,
    ) -> ExperimentConfig:
        """The config of one run's experiment named ``experiment`` (``sites``: a subset that trains).

        The quorum (``min_sites``) is capped at the number of sites that train.
        """
        values = dict(self.experiment)
        chosen = list(self.sites if sites is None else sites)
        if isinstance(values.get("min_sites"), int):
            values["min_sites"] = min(int(values["min_sites"]), len(chosen))
        datasets = {s: v for s, v in dict(values.get("datasets") or {}).items() if s in chosen}
        return ExperimentConfig.from_dict(
            {
                **values,
                "datasets": datasets,
                "name": experiment,
                "sites": chosen,
                "rounds": self.rounds,
                "case_selection": dict(case_selection or {}),
            }
        )

    def due_slot(self, now: datetime) -> datetime:
        """The latest scheduled time at or before ``now`` (a run for it is due once)."""
        base = croniter(self.schedule, now)
        nxt = base.get_next(datetime)
        return base.get_prev(datetime) if nxt > now else nxt

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data.update(
            format=LINE_FORMAT,
            sites=list(self.sites),
            experiment=dict(self.experiment),
            rule=self.rule.to_dict(),
        )
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LineConfig:
        """Inverse of :meth:`to_dict`; unknown keys and other formats are errors."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a line must be a JSON object, got {type(data).__name__}")
        values = dict(data)
        where = f"line {values.get('name')!r}"
        fmt = values.pop("format", LINE_FORMAT)
        if fmt != LINE_FORMAT:
            raise ValueError(f"{where}: unsupported line format {fmt!r}; expected {LINE_FORMAT}")
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}")
        if "name" not in values or "sites" not in values:
            raise ValueError(f"{where}: 'name' and 'sites' are required")
        if not isinstance(values.get("experiment", {}), Mapping):
            raise ValueError(f"{where}: experiment must be an object")
        try:
            values["rule"] = ReleaseRule.from_dict(values.get("rule", {}))
        except ValueError as exc:
            raise ValueError(f"{where}: rule: {exc}") from None
        return cls(**values)

    def updated(self, changes: Mapping[str, Any]) -> LineConfig:
        """A copy with ``changes`` applied; ``experiment`` and ``rule`` are merged key by key."""
        data = self.to_dict()
        for key, value in changes.items():
            if key in ("experiment", "rule") and isinstance(value, Mapping):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return LineConfig.from_dict(data)


_SLUG = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"}
#: JSON Schema of a line (what :meth:`LineConfig.from_dict` accepts; it also checks the cron
#: expression and builds the experiment config, which a schema cannot).
LINE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "JIP Federated model line",
    "type": "object",
    "required": ["name", "sites"],
    "additionalProperties": False,
    "properties": {
        "format": {"const": LINE_FORMAT},
        "name": _SLUG,
        "sites": {"type": "array", "items": _SLUG, "minItems": 1, "uniqueItems": True},
        "experiment": {
            "type": "object",
            "propertyNames": {"enum": list(EXPERIMENT_KEYS)},
            "description": "experiment settings of each run (ExperimentConfig fields)",
        },
        "rounds": {"type": "integer", "minimum": 1},
        "schedule": {"type": "string", "description": "cron expression, UTC", "default": DEFAULT_SCHEDULE},
        "replay": {"type": "integer", "minimum": 0},
        "rule": ReleaseRule.SCHEMA,
        "evaluation_timeout_s": {"type": "number", "exclusiveMinimum": 0},
        "census_timeout_s": {"type": "number", "exclusiveMinimum": 0},
        "paused": {"type": "boolean"},
    },
}
