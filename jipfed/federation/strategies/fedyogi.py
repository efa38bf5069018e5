"""FedYogi: Yogi as the server optimiser on the pseudo-gradient.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (https://arxiv.org/abs/2003.00295):
``v = v - (1 - beta2) delta^2 sign(v - delta^2)``; shared update in
:mod:`jipfed.federation.strategies.fedopt`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from jipfed.federation.strategies.fedopt import _AdaptiveFedOpt


class FedYogi(_AdaptiveFedOpt):
    """Args: ``eta`` (0.01), ``beta1`` (0.9), ``beta2`` (0.99), ``tau`` (1e-3)."""

    name: ClassVar[str] = "fedyogi"

    def __init__(
        self,
        *,
        eta: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
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
        sign = torch.sign(v - delta_sq)
        v.addcmul_(delta_sq, sign, value=-(1.0 - self.beta2))
