"""Coordinate-wise median of the sites' models (Byzantine-robust aggregation).

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018 (https://arxiv.org/abs/1803.01498).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from jipfed.federation.aggregate import coordinatewise_median
from jipfed.federation.strategies.base import Strategy, accumulate_dtype_of, checked_updates
from jipfed.federation.update import UpdateSource
from jipfed.storage.layout import validate_round


class Median(Strategy):
    """Global + coordinate-wise median of the deltas (even count: mean of the two middle values).

    Ignores ``n_samples``. Reads the updates tensor by tensor: pass
    :class:`~jipfed.federation.codec.LazyUpdate` objects to keep memory O(sites x largest tensor).
    """

    name: ClassVar[str] = "median"

    def __init__(self, *, accumulate_dtype: str | None = None) -> None:
        self._dtype = accumulate_dtype_of(accumulate_dtype)
        self.accumulate_dtype = accumulate_dtype

    def aggregate(
        self, global_weights: Mapping[str, torch.Tensor], updates: Iterable[UpdateSource], round: int
    ) -> dict[str, torch.Tensor]:
        validate_round(round)
        return coordinatewise_median(
            global_weights, list(checked_updates(updates, round)), accumulate_dtype=self._dtype
        )

    def config(self) -> dict[str, Any]:
        return {"accumulate_dtype": self.accumulate_dtype}
