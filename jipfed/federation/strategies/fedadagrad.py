"""FedAdagrad: Adagrad as the server optimiser on the pseudo-gradient.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (https://arxiv.org/abs/2003.00295):
``v = v + delta^2``; shared update in :mod:`jipfed.federation.strategies.fedopt`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from jipfed.federation.strategies.fedopt import _AdaptiveFedOpt


class FedAdagrad(_AdaptiveFedOpt):
    """Args: ``eta`` (0.1), ``beta1`` momentum (0.0 = plain Adagrad), ``tau`` (1e-9); no ``beta2``."""

    name: ClassVar[str] = "fedadagrad"

    def __init__(
        self,
        *,
        eta: float = 0.1,
        beta1: float = 0.0,
        tau: float = 1e-9,
        accumulate_dtype: str | None = None,
        integer_mode: str = "max",
        **options: Any,
    ) -> None:
        super().__init__(
            eta=eta,
            beta1=beta1,
            beta2=0.0,
            tau=tau,
            accumulate_dtype=accumulate_dtype,
            integer_mode=integer_mode,
            **options,
        )

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.add_(delta_sq)

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        del cfg["beta2"]
        return cfg
