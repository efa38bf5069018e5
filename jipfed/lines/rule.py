"""The release rule: is a line's candidate at least as good as its released model on every site?

Input is a federated evaluation summary (:func:`jipfed.federation.evaluation.summarise`) holding
both models' scores per site and weighted by the sites' held-out case counts. The verdict records
every comparison it made, so the history shows why a candidate was or was not released.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

MISSING_POLICIES = ("block", "ignore")


def finite_number(value: object, what: str, *, minimum: float, strict: bool = False) -> float:
    """``value`` as a float if it is a finite number >= ``minimum`` (> with ``strict``); else ValueError."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < minimum
        or (strict and value == minimum)
    ):
        raise ValueError(f"{what} must be a finite number {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


CANDIDATE, RELEASED = "candidate", "released"


@dataclass(frozen=True)
class ReleaseRule:
    """When a candidate replaces the released model (higher ``metric`` is better).

    Attributes:
        metric: the held-out score compared, e.g. ``dice_mean`` (segmentation) or ``accuracy``.
        max_weighted_drop: the candidate's case-weighted score may be at most this much below the
            released model's (0 = not lower).
        site_tolerance: no site's score may drop by more than this.
        missing_site: a site that could not evaluate ``"block"`` s the release or is ``"ignore"`` d.
        min_sites: the fewest sites that must have scored both models.
    """

    metric: str = "dice_mean"
    max_weighted_drop: float = 0.0
    site_tolerance: float = 0.05
    missing_site: str = "block"
    min_sites: int = 1

    SCHEMA: ClassVar[dict[str, Any]] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "metric": {"type": "string", "minLength": 1},
            "max_weighted_drop": {"type": "number", "minimum": 0},
            "site_tolerance": {"type": "number", "minimum": 0},
            "missing_site": {"enum": list(MISSING_POLICIES)},
            "min_sites": {"type": "integer", "minimum": 1},
        },
    }

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"metric must be a non-empty string, got {self.metric!r}")
        for what in ("max_weighted_drop", "site_tolerance"):
            object.__setattr__(self, what, finite_number(getattr(self, what), what, minimum=0.0))
        if self.missing_site not in MISSING_POLICIES:
            raise ValueError(f"missing_site must be one of {MISSING_POLICIES}, got {self.missing_site!r}")
        if isinstance(self.min_sites, bool) or not isinstance(self.min_sites, int) or self.min_sites < 1:
            raise ValueError(f"min_sites must be an integer >= 1, got {self.min_sites!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReleaseRule:
        if not isinstance(data, Mapping):
            raise ValueError(f"a release rule must be an object, got {data!r}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown release rule key(s) {unknown}")
        return cls(**data)

    def apply(self, summary: Mapping[str, Any], *, has_released: bool) -> dict[str, Any]:
        """The verdict on ``summary`` (an evaluation of ``candidate`` and, if any, ``released``).

        Returns ``{"release": bool, "reasons": [...], "checks": {...}}``; the reasons say what
        failed (or, on release, why it passed).
        """
        sites: Mapping[str, Any] = summary.get("sites", {})
        failed: Mapping[str, str] = summary.get("failed", {})
        labels = (CANDIDATE, RELEASED) if has_released else (CANDIDATE,)
        scored = {
            s: r for s, r in sites.items() if all(_score(r, lab, self.metric) is not None for lab in labels)
        }
        reasons: list[str] = []
        missing = sorted(set(failed) | (set(sites) - set(scored)))
        if missing and self.missing_site == "block":
            reasons.append(f"site(s) {missing} could not evaluate both models (missing_site=block)")
        if len(scored) < self.min_sites:
            reasons.append(f"only {len(scored)} site(s) scored the models, the rule needs {self.min_sites}")
        checks: dict[str, Any] = {"metric": self.metric, "sites": {}, "missing": missing}
        weighted = {lab: _weighted(scored, lab, self.metric) for lab in labels}
        checks["weighted"] = weighted
        cand, rel = weighted[CANDIDATE], weighted.get(RELEASED)
        if cand is not None and rel is not None:
            if cand < rel - self.max_weighted_drop:
                reasons.append(
                    f"weighted {self.metric} {cand:.4f} is below the released model's {rel:.4f} "
                    f"by more than {self.max_weighted_drop}"
                )
            for site, record in sorted(scored.items()):
                drop = _score(record, RELEASED, self.metric) - _score(record, CANDIDATE, self.metric)
                checks["sites"][site] = {"drop": drop}
                if drop > self.site_tolerance:
                    reasons.append(
                        f"site {site}: {self.metric} drops by {drop:.4f} (tolerance {self.site_tolerance})"
                    )
        release = not reasons
        if release:
            reasons.append(
                "first version of the line"
                if not has_released
                else f"not worse than the released model on {self.metric}"
            )
        return {"release": release, "reasons": reasons, "checks": checks}


def _score(record: Mapping[str, Any], label: str, metric: str) -> float | None:
    value = record.get("metrics", {}).get(label, {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _weighted(scored: Mapping[str, Any], label: str, metric: str) -> float | None:
    total = sum(int(r["n_cases"]) for r in scored.values())
    if not total:
        return None
    return sum(int(r["n_cases"]) * (_score(r, label, metric) or 0.0) for r in scored.values()) / total
