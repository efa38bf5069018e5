"""opacus' DP optimiser with ChaCha20 noise (imports opacus: only loaded when DP-SGD runs)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from opacus.optimizers import DPOptimizer

from jipfed.privacy.secure_noise import ChaChaNormal, secure_normal


class SecureDPOptimizer(DPOptimizer):
    """opacus' DP optimiser with ChaCha20 noise; each step's noised sum of clipped per-case gradients
    is divided by the expected batch size (Poisson sampling: :mod:`jipfed.privacy.poisson_sampling`).

    ``views`` > 1 (augmentation multiplicity): the forward pass held ``views`` consecutive views of each
    case (:func:`jipfed.privacy.sample_dp.augmented_views`); each case's per-sample gradient is the mean
    of its views' gradients, taken before clipping, so the step clips, sums and noises one gradient per
    case exactly as with one view.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, noise: ChaChaNormal, views: int = 1, **kwargs: object
    ) -> None:
        super().__init__(optimizer, **kwargs)
        self._noise = noise
        self._views = views

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            noise = secure_normal(std, p.summed_grad, self._noise) if std > 0 else 0.0
            p.grad = (p.summed_grad + noise).view_as(p)

    def pre_step(self, closure: Callable[[], float] | None = None) -> float | None:
        if self._views > 1:
            self._average_views()
        return super().pre_step(closure)

    def step_without_cases(self) -> None:
        """The step of an empty Poisson batch: no gradient, the noise alone (divided by the expected
        batch size, as every step's)."""
        for p in self.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
        self.step()

    def _average_views(self) -> None:
        """Replace each parameter's (cases * views, ...) per-sample gradients by their per-case means."""
        for p in self.params:
            sample = self._get_flat_grad_sample(p)
            if sample.shape[0] % self._views:
                raise ValueError(
                    f"DP-SGD with {self._views} augmented views got {sample.shape[0]} per-sample gradients, "
                    "not a whole number of cases"
                )
            p.grad_sample = sample.view(-1, self._views, *sample.shape[1:]).mean(1)
