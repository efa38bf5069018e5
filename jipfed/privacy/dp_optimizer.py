"""opacus' DP optimiser with ChaCha20 noise (imports opacus: only loaded when DP-SGD runs)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from opacus.optimizers import DPOptimizer

from jipfed.privacy.secure_noise import ChaChaNormal, secure_normal


class SecureDPOptimizer(DPOptimizer):
    """opacus' DP optimiser with ChaCha20 noise, averaging each step over that step's batch size."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise: ChaChaNormal, **kwargs: object) -> None:
        super().__init__(optimizer, **kwargs)
        self._noise = noise

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            noise = secure_normal(std, p.summed_grad, self._noise) if std > 0 else 0.0
            p.grad = (p.summed_grad + noise).view_as(p)

    def pre_step(self, closure: Callable[[], float] | None = None) -> float | None:
        samples = self.grad_samples
        if samples and samples[0] is not None:
            self.expected_batch_size = int(
                samples[0].shape[0]
            )  # fixed-size shuffled batches, last one smaller
        return super().pre_step(closure)
