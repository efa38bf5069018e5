"""What the central asks a site to train with in one round (a plan step's ``fit_config``), validated.

Strategies produce these settings (``Strategy.configure_fit``); the site parses them with
:meth:`FitSettings.from_config` and hands them to :meth:`LocalTrainer.train`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jipfed.privacy.settings import SampleDP

#: Keys a fit config may hold.
FIT_KEYS = ("mu", "lr_scale", "local_patterns", "scaffold", "feddyn_alpha", "dp_sgd")


def _number(value: Any, what: str, *, positive: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ValueError(f"{what} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class FitSettings:
    """Attributes:
    mu: FedProx proximal weight (None = the training config's ``fedprox_mu``).
    lr_scale: multiplier of the local learning rate this round (local learning-rate schedule).
    local_patterns: fnmatch patterns of state-dict entries that stay at the site (FedBN-style).
    scaffold: train with SCAFFOLD control variates and return the control correction.
    feddyn_alpha: FedDyn regulariser weight (0 = off).
    dp_sgd: sample-level DP settings (:class:`jipfed.privacy.settings.SampleDP`); None = off.
    """

    mu: float | None = None
    lr_scale: float = 1.0
    local_patterns: tuple[str, ...] = ()
    scaffold: bool = False
    feddyn_alpha: float = 0.0
    dp_sgd: SampleDP | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FitSettings:
        """Parse a fit config; ValueError naming the unknown key or bad value."""
        unknown = sorted(set(config) - set(FIT_KEYS))
        if unknown:
            raise ValueError(f"unsupported fit settings {unknown} (known: {list(FIT_KEYS)})")
        mu = config.get("mu")
        patterns = config.get("local_patterns", [])
        if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
            raise ValueError(f"local_patterns must be a list of strings, got {patterns!r}")
        if not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(f"local_patterns must be non-empty strings, got {patterns!r}")
        scaffold = config.get("scaffold", False)
        if not isinstance(scaffold, bool):
            raise ValueError(f"scaffold must be a boolean, got {scaffold!r}")
        return cls(
            mu=None if mu is None else _number(mu, "mu", positive=False),
            lr_scale=_number(config.get("lr_scale", 1.0), "lr_scale", positive=True),
            local_patterns=tuple(patterns),
            scaffold=scaffold,
            feddyn_alpha=_number(config.get("feddyn_alpha", 0.0), "feddyn_alpha", positive=False),
            dp_sgd=_sample_dp(config.get("dp_sgd")),
        )


def _sample_dp(value: Any) -> SampleDP | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"dp_sgd must be an object of DP-SGD settings, got {value!r}")
    try:
        return SampleDP(**value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"dp_sgd: {exc}") from None
