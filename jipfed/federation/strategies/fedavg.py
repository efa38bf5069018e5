"""FedAvg: the new global model is the sample-weighted mean of the sites' models.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep Networks
from Decentralized Data", AISTATS 2017 (https://arxiv.org/abs/1602.05629).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from jipfed.federation.aggregate import INTEGER_MODES, TensorSink, mean_weights
from jipfed.federation.strategies.base import Strategy, accumulate_dtype_of, checked_updates
from jipfed.federation.strategies.site_options import SiteOptions
from jipfed.federation.update import UpdateSource
from jipfed.storage.layout import validate_round


class FedAvg(Strategy):
    """Sample-weighted mean (weight = ``n_samples``), streamed over the updates in O(model) memory.

    Args:
        accumulate_dtype: ``None`` (float32, or float64 for float64 models), ``"float32"``, ``"float64"``.
        integer_mode: integer buffers: ``"max"`` over sites or the ``"first"`` site's value.
        local_patterns, local_lr_schedule: see :mod:`~jipfed.federation.strategies.site_options`.
    """

    name: ClassVar[str] = "fedavg"

    def __init__(
        self,
        *,
        accumulate_dtype: str | None = None,
        integer_mode: str = "max",
        local_patterns: list[str] | None = None,
        local_lr_schedule: dict[str, Any] | None = None,
    ) -> None:
        self.site_options = SiteOptions.build(local_patterns, local_lr_schedule)
        self._dtype = accumulate_dtype_of(accumulate_dtype)
        if integer_mode not in INTEGER_MODES:
            raise ValueError(f"integer_mode must be one of {INTEGER_MODES}, got {integer_mode!r}")
        self.accumulate_dtype = accumulate_dtype
        self.integer_mode = integer_mode

    def aggregate(
        self, global_weights: Mapping[str, torch.Tensor], updates: Iterable[UpdateSource], round: int
    ) -> dict[str, torch.Tensor]:
        return self._mean(global_weights, updates, round, None)

    def aggregate_streamed(
        self,
        global_weights: Mapping[str, torch.Tensor],
        updates: Iterable[UpdateSource],
        round: int,
        on_tensor: TensorSink,
    ) -> dict[str, torch.Tensor]:
        """Each mean tensor goes to ``on_tensor`` once final (unless a subclass changes :meth:`aggregate`)."""
        if type(self).aggregate is not FedAvg.aggregate:
            return super().aggregate_streamed(global_weights, updates, round, on_tensor)
        return self._mean(global_weights, updates, round, on_tensor)

    def _mean(
        self,
        global_weights: Mapping[str, torch.Tensor],
        updates: Iterable[UpdateSource],
        round: int,
        on_tensor: TensorSink | None,
    ) -> dict[str, torch.Tensor]:
        validate_round(round)
        return mean_weights(
            global_weights,
            checked_updates(updates, round),
            accumulate_dtype=self._dtype,
            integer_mode=self.integer_mode,
            on_tensor=on_tensor,
        )

    def plain_mean_mode(self) -> str | None:
        """``integer_mode`` when this strategy aggregates exactly as FedAvg with float32 accumulation
        (so a flat mean of stored files, :mod:`jipfed.federation.flat_mean`, gives the same result),
        else None (a subclass that changes the aggregation, or float64 accumulation)."""
        same = all(
            getattr(type(self), f) is getattr(FedAvg, f) for f in ("aggregate", "aggregate_streamed", "_mean")
        )
        return self.integer_mode if same and self._dtype in (None, torch.float32) else None

    def configure_fit(self, round: int) -> dict[str, Any]:
        return {**super().configure_fit(round), **self.site_options.fit(round)}

    def config(self) -> dict[str, Any]:
        return {
            "accumulate_dtype": self.accumulate_dtype,
            "integer_mode": self.integer_mode,
            **self.site_options.config(),
        }
