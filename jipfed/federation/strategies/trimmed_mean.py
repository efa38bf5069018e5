"""Coordinate-wise trimmed mean of the sites' models (Byzantine-robust aggregation).

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018 (https://arxiv.org/abs/1803.01498).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from jipfed.federation.aggregate import coordinatewise_trimmed_mean, trim_count
from jipfed.federation.strategies.base import Strategy, accumulate_dtype_of, checked_updates
from jipfed.federation.update import UpdateSource
from jipfed.storage.layout import validate_round


class TrimmedMean(Strategy):
    """Global + coordinate-wise mean of the deltas after dropping ``floor(beta * n)`` at each end.

    Args:
        beta: fraction trimmed at each end, in [0, 0.5); 0 is the plain (unweighted) mean. To
            tolerate ``f`` poisoned sites out of ``n`` choose ``beta >= f / n``.
        accumulate_dtype: as for FedAvg.

    Ignores ``n_samples``; reads the updates tensor by tensor like :class:`Median`.
    """

    name: ClassVar[str] = "trimmed_mean"

    def __init__(self, *, beta: float = 0.1, accumulate_dtype: str | None = None) -> None:
        trim_count(1, beta)
        self.beta = float(beta)
        self._dtype = accumulate_dtype_of(accumulate_dtype)
        self.accumulate_dtype = accumulate_dtype

    def aggregate(
        self, global_weights: Mapping[str, torch.Tensor], updates: Iterable[UpdateSource], round: int
    ) -> dict[str, torch.Tensor]:
        validate_round(round)
        sources = list(checked_updates(updates, round))
        return coordinatewise_trimmed_mean(
            global_weights, sources, beta=self.beta, accumulate_dtype=self._dtype
        )

    def config(self) -> dict[str, Any]:
        return {"beta": self.beta, "accumulate_dtype": self.accumulate_dtype}
