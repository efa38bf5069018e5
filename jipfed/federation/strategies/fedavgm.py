"""FedAvgM: FedAvg with server momentum on the pseudo-gradient.

Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification", 2019 (https://arxiv.org/abs/1909.06335).

``v = momentum * v + delta``; ``x = x + server_lr * v`` with ``delta = mean_w(site models) - x``.
``momentum=0, server_lr=1`` is FedAvg.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from jipfed.federation.strategies.base import check_float
from jipfed.federation.strategies.fedopt import FedOpt


class FedAvgM(FedOpt):
    """Server SGD with momentum. Args: ``server_lr`` (> 0, default 1.0), ``momentum`` in [0, 1) (0.9)."""

    name: ClassVar[str] = "fedavgm"
    buffers: ClassVar[tuple[str, ...]] = ("momentum",)

    def __init__(
        self,
        *,
        server_lr: float = 1.0,
        momentum: float = 0.9,
        accumulate_dtype: str | None = None,
        integer_mode: str = "max",
        **options: Any,
    ) -> None:
        super().__init__(
            eta=server_lr, accumulate_dtype=accumulate_dtype, integer_mode=integer_mode, **options
        )
        self.momentum = check_float(momentum, "momentum", low=0.0, high=1.0, high_open=True)

    def _step(self, name: str, g: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        v = self._buffer("momentum", name, delta)
        v.mul_(self.momentum).add_(delta)
        return torch.add(g, v, alpha=self._lr)

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        return {"server_lr": cfg.pop("eta"), "momentum": self.momentum, **cfg}
