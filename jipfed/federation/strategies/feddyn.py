"""FedDyn: federated learning with a dynamic regulariser.

Acar, Zhao, Matas, Mattina, Whatmough, Saligrama, "Federated Learning Based on Dynamic
Regularization", ICLR 2021 (https://arxiv.org/abs/2111.04263).

Site i minimises ``L_i(w) - <g_i, w> + alpha / 2 ||w - w_global||^2``, where ``g_i`` (its
linearised past gradient) stays at the site and is updated after the round as
``g_i = g_i - alpha (w_i - w_global)`` (:class:`~jipfed.training.local.LocalTrainer`, fit setting
``feddyn_alpha``). The server keeps ``h = h - alpha * delta`` and sets
``w = w_global + delta - h / alpha`` with ``delta`` the sample-weighted mean site delta (the
paper averages uniformly over all sites). Trainable weights only; buffers take FedAvg's value.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from jipfed.federation.strategies.base import check_float
from jipfed.federation.strategies.fedopt import FedOpt


class FedDyn(FedOpt):
    """Args: ``alpha`` (> 0, default 0.01) and the :class:`FedOpt` options (no server learning rate)."""

    name: ClassVar[str] = "feddyn"
    buffers: ClassVar[tuple[str, ...]] = ("h",)

    def __init__(
        self,
        *,
        alpha: float = 0.01,
        accumulate_dtype: str | None = None,
        integer_mode: str = "max",
        **options: Any,
    ) -> None:
        super().__init__(eta=1.0, accumulate_dtype=accumulate_dtype, integer_mode=integer_mode, **options)
        self.alpha = check_float(alpha, "alpha", low=0.0, low_open=True)

    def configure_fit(self, round: int) -> dict[str, Any]:
        return {**super().configure_fit(round), "feddyn_alpha": self.alpha}

    def _step(self, name: str, g: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        h = self._buffer("h", name, delta)
        h.sub_(delta, alpha=self.alpha)
        return torch.add(g, delta).sub_(h, alpha=1.0 / self.alpha)

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        del cfg["eta"]
        return {"alpha": self.alpha, **cfg}
