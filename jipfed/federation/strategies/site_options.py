"""Options every FedAvg- and FedOpt-family strategy passes to the sites through ``configure_fit``.

- ``local_patterns``: fnmatch patterns of state-dict names that stay at each site (FedBN-style:
  e.g. ``["*norm*"]`` keeps normalisation / adapter parameters local). Sites train them, keep
  them between rounds and send them unchanged (a zero delta), so they never leave the site and
  the server leaves them where they are.
- ``local_lr_schedule``: :class:`~jipfed.federation.strategies.schedules.Schedule` spec scaling
  the sites' learning rate per round (fit setting ``lr_scale``).

Unset options add nothing to the fit settings or to the strategy's config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jipfed.federation.strategies.schedules import Schedule


@dataclass(frozen=True)
class SiteOptions:
    """Validated site-side options of a strategy."""

    local_patterns: tuple[str, ...] = ()
    local_lr: Schedule | None = None

    @classmethod
    def build(
        cls, local_patterns: Sequence[str] | None, local_lr_schedule: dict[str, Any] | None
    ) -> SiteOptions:
        patterns = tuple(local_patterns or ())
        if isinstance(local_patterns, str) or not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(f"local_patterns must be a list of non-empty strings, got {local_patterns!r}")
        return cls(patterns, Schedule.from_spec(local_lr_schedule, "local_lr_schedule"))

    def fit(self, round: int) -> dict[str, Any]:
        """Fit settings of round ``round`` these options add."""
        out: dict[str, Any] = {}
        if self.local_patterns:
            out["local_patterns"] = list(self.local_patterns)
        if self.local_lr is not None:
            out["lr_scale"] = self.local_lr.factor(round)
        return out

    def config(self) -> dict[str, Any]:
        """Constructor arguments of the options that are set."""
        out: dict[str, Any] = {}
        if self.local_patterns:
            out["local_patterns"] = list(self.local_patterns)
        if self.local_lr is not None:
            out["local_lr_schedule"] = self.local_lr.to_spec()
        return out
