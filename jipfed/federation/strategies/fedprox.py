"""FedProx: FedAvg aggregation; sites add a proximal term (mu / 2) ||w - w_global||^2 to their loss.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous Networks",
MLSys 2020 (https://arxiv.org/abs/1812.06127).

Only what is sent to the sites changes (:meth:`FedProx.configure_fit` returns ``{"mu": mu}``);
:func:`proximal_term` is the site-side loss term the trainer adds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from jipfed.federation.strategies.base import check_float
from jipfed.federation.strategies.fedavg import FedAvg


def proximal_term(model: nn.Module, global_params: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """``(mu / 2) * sum ||w - w_global||^2`` over the trainable parameters, differentiable in ``w``.

    ``global_params`` maps ``model.named_parameters()`` names to detached tensors (any device; moved
    to each parameter's). Parameters with ``requires_grad=False`` are skipped; a model without
    trainable parameters gives a 0-d zero.
    """
    mu = check_float(mu, "mu", low=0.0)
    terms = [
        torch.sum((param - global_params[name].to(param.device)) ** 2)
        for name, param in model.named_parameters()
        if param.requires_grad
    ]
    if not terms:
        return torch.zeros(())
    return 0.5 * mu * torch.stack(terms).sum()


class FedProx(FedAvg):
    """FedAvg whose sites train with the proximal weight ``mu`` (>= 0; 0 is plain FedAvg)."""

    name: ClassVar[str] = "fedprox"

    def __init__(
        self,
        *,
        mu: float = 0.01,
        accumulate_dtype: str | None = None,
        integer_mode: str = "max",
        **site_options: Any,
    ) -> None:
        super().__init__(accumulate_dtype=accumulate_dtype, integer_mode=integer_mode, **site_options)
        self.mu = check_float(mu, "mu", low=0.0)

    def configure_fit(self, round: int) -> dict[str, Any]:
        return {**super().configure_fit(round), "mu": self.mu}

    def config(self) -> dict[str, Any]:
        return {"mu": self.mu, **super().config()}
