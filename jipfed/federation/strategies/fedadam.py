"""FedAdam: Adam (without bias correction) as the server optimiser on the pseudo-gradient.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (https://arxiv.org/abs/2003.00295):
``v = beta2 v + (1 - beta2) delta^2``; shared update in :mod:`jipfed.federation.strategies.fedopt`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from jipfed.federation.strategies.fedopt import _AdaptiveFedOpt


class FedAdam(_AdaptiveFedOpt):
    """Args: ``eta`` (0.05), ``beta1`` (0.5), ``beta2`` (0.99), ``tau`` (1e-2).

    The defaults are the settings measured on our U-Nets (``benchmarks/fl_vs_central.py``). The
    paper's small ``tau`` makes the first steps ``~ eta * sign(delta)`` per coordinate, i.e. every
    weight moves by ``eta`` regardless of how little the sites changed it; ``tau = 1e-2`` keeps a
    step proportional to the pseudo-gradient until its moments are established.
    """

    name: ClassVar[str] = "fedadam"

    def __init__(
        self,
        *,
        eta: float = 0.05,
        beta1: float = 0.5,
        beta2: float = 0.99,
        tau: float = 1e-2,
        accumulate_dtype: str | None = None,
        integer_mode: str = "max",
        **options: Any,
    ) -> None:
        super().__init__(
            eta=eta,
            beta1=beta1,
            beta2=beta2,
            tau=tau,
            accumulate_dtype=accumulate_dtype,
            integer_mode=integer_mode,
            **options,
        )

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.mul_(self.beta2).add_(delta_sq, alpha=1.0 - self.beta2)
