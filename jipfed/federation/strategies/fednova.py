"""FedNova: normalised averaging for sites that take unequal numbers of local steps.

Wang, Liu, Liang, Joshi, Poor, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization", NeurIPS 2020 (https://arxiv.org/abs/2007.07481).

With ``p_i = n_i / n`` and ``tau_i`` site i's local steps (``steps`` in its manifest metrics),
each site's delta is normalised to a per-step direction and the average rescaled by the
effective number of steps: ``x = x + server_lr * tau_eff * sum_i p_i delta_i / tau_i`` with
``tau_eff = sum_i p_i tau_i``. Plain FedAvg over-weights sites that take more steps (bigger
sites, with local work in epochs); FedNova removes that bias while keeping the step length.
Trainable weights only, as every server optimiser: buffers (running statistics) take the convex
combination of the sites' values with the normalised weights ``n_i / tau_i``, with no rescaling.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from jipfed.federation.strategies.fedopt import ServerSGD
from jipfed.federation.update import UpdateManifest, UpdateSource


class FedNova(ServerSGD):
    """Args: ``server_lr`` (> 0, default 1.0) and the :class:`FedOpt` options."""

    name: ClassVar[str] = "fednova"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sums = [0.0, 0.0, 0.0]  # sum n_i, sum n_i / tau_i, sum n_i * tau_i of the current round

    def aggregate(
        self, global_weights: Mapping[str, torch.Tensor], updates: Iterable[UpdateSource], round: int
    ) -> dict[str, torch.Tensor]:
        self._sums = [0.0, 0.0, 0.0]
        return super().aggregate(global_weights, updates, round)

    def _site_weight(self, manifest: UpdateManifest) -> float:
        steps = manifest.metrics.get("steps")
        if steps is None or not math.isfinite(steps) or steps < 1:
            raise ValueError(
                f"FedNova needs the local step count: update from site {manifest.site!r} in round "
                f"{manifest.round} reports steps={steps!r}"
            )
        n = float(manifest.n_samples)
        self._sums[0] += n
        self._sums[1] += n / steps
        self._sums[2] += n * steps
        return n / steps

    def _step(self, name: str, g: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        # delta = sum (n_i / tau_i) d_i / sum (n_i / tau_i); FedNova's step is tau_eff * sum p_i d_i / tau_i
        total, per_step, weighted_steps = self._sums
        scale = (weighted_steps / total) * (per_step / total)
        return torch.add(g, delta, alpha=self._lr * scale)
