"""Sample-level DP at a site: DP-SGD with opacus (per-case gradient clipping, Gaussian noise, accountant).

Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (https://arxiv.org/abs/1607.00133).
:class:`DPSGD` draws one round's batches, wraps its model and optimiser in opacus' ``GradSampleModule``
and ``DPOptimizer`` (not ``PrivacyEngine``: see the averaging below) and keeps the site's accountant
history across rounds (``history``: ``(noise, sample rate, steps)``, persisted with the site's state).

Sampling: each step takes every training case with probability q = batch / cases (Poisson sampling
from a secret ChaCha20 stream, :mod:`jipfed.privacy.poisson_sampling`), the mechanism the
accountant's ε at sample rate q is proven for. Averaging: the step's noised sum of clipped per-case
gradients is divided by the expected batch size q * cases, so a step's size reveals nothing beyond
that sum (the step of an empty batch is noise only); opacus' ``make_private`` would divide by
``int(cases / batches)``, e.g. 1 for 9 cases in batches of 2: twice the step and the noise. Noise:
ChaCha20 keyed with 32 bytes of OS randomness (:func:`secure_normal`, with opacus'
floating-point-attack defence), never the experiment seed (which the central knows): opacus' own
``secure_mode`` needs ``torchcsprng``, whose last release (0.2.1) pins torch 1.8.1. Tests pass a
fixed ``noise_key``.

Models: MONAI's ``unet`` (Conv3d, ConvTranspose3d, PReLU, InstanceNorm without affine) works in all
size presets. ``segresnet`` fails in opacus' hooks (in-place activations on views); ``densenet`` and
``resnet`` use BatchNorm, whose per-batch statistics mix cases (opacus refuses it; replacing it by
GroupNorm would change the shared weights): those are refused with this reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from jipfed.privacy.accountant import epsilon_after, noise_for_budget
from jipfed.privacy.poisson_sampling import poisson_loader
from jipfed.privacy.secure_noise import ChaChaNormal
from jipfed.privacy.settings import DP_SGD_MODELS, SampleDP


def check_model(model_name: str) -> None:
    """ValueError naming why DP-SGD cannot train ``model_name``."""
    if model_name not in DP_SGD_MODELS:
        raise ValueError(
            f"sample-level DP (DP-SGD) supports {DP_SGD_MODELS}; {model_name!r} has BatchNorm or in-place "
            "activations that opacus cannot compute per-case gradients for"
        )


#: Largest circular shift (voxels, each spatial axis) of an augmented view.
VIEW_SHIFT = 2


def augmented_views(
    image: torch.Tensor, target: torch.Tensor, views: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``views`` views of each case of a (B, C, X, Y, Z) batch, case-major ((B * views, ...): case i's
    views at ``i * views ... i * views + views - 1``): the case as loaded, then random flips (p = 0.5 per
    spatial axis) and circular shifts of up to :data:`VIEW_SHIFT` voxels per axis, the same for image
    and segmentation target (a class label is repeated). ``views == 1`` returns the batch itself and
    draws nothing."""
    if views == 1:
        return image, target
    dims = [1, 2, 3]  # spatial axes of one case (C, X, Y, Z)
    images, targets = [], []
    for x, y in zip(image, target, strict=True):
        images.append(x)
        targets.append(y)
        for _ in range(views - 1):
            flips = [d for d in dims if torch.rand((), generator=generator).item() < 0.5]
            shifts = torch.randint(-VIEW_SHIFT, VIEW_SHIFT + 1, (3,), generator=generator).tolist()
            images.append(_moved(x, flips, shifts))
            targets.append(_moved(y, flips, shifts) if y.ndim == x.ndim else y)
    return torch.stack(images), torch.stack(targets)


def _moved(volume: torch.Tensor, flips: list[int], shifts: list[int]) -> torch.Tensor:
    flipped = torch.flip(volume, flips) if flips else volume
    return torch.roll(flipped, shifts, [1, 2, 3])


def epsilon_of(history: Sequence[tuple[float, float, int]], settings: SampleDP) -> float:
    """ε of a site's DP-SGD history (phases with one noise and sample rate each)."""
    if settings.accountant == "rdp":
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = [(float(z), float(q), int(t)) for z, q, t in history]
        return float(accountant.get_epsilon(delta=settings.delta)) if history else 0.0
    if len({(z, q) for z, q, _ in history}) > 1:
        raise ValueError("the PRV accountant here takes one noise and sample rate per site")
    if not history:
        return 0.0
    z, q, _ = history[0]
    return epsilon_after(
        z, sum(t for *_, t in history), delta=settings.delta, sample_rate=q, accountant="prv"
    )


@dataclass
class DPSGD:
    """One site's DP-SGD: :meth:`wrap` a round's training objects, :meth:`finish` it, ε via :meth:`epsilon`."""

    settings: SampleDP
    history: list[tuple[float, float, int]] = field(default_factory=list)
    #: ChaCha20 key of the noise; None = 32 fresh bytes from the OS each round (tests fix it).
    noise_key: bytes | None = None
    #: This round's noise multiplier (:meth:`calibrate` sets it).
    noise_multiplier: float | None = None

    def epsilon(self, extra_steps: int = 0, sample_rate: float | None = None) -> float:
        """ε spent so far, or after ``extra_steps`` more steps at ``sample_rate``."""
        history = list(self.history)
        if extra_steps:
            history.append((self._noise(), float(sample_rate or 1.0), extra_steps))
        return epsilon_of(history, self.settings)

    def _noise(self) -> float:
        if self.noise_multiplier is None:
            raise RuntimeError("DPSGD.calibrate sets the round's noise multiplier before training")
        return self.noise_multiplier

    def calibrate(self, steps: int, sample_rate: float, where: str) -> float:
        """Set and return the round's noise multiplier: the configured one; else the site's earlier
        one; else the smallest that keeps ``epsilon`` after ``planned_rounds`` rounds of ``steps`` at
        ``sample_rate``."""
        self.noise_multiplier = self._calibrated(steps, sample_rate, where)
        return self.noise_multiplier

    def _calibrated(self, steps: int, sample_rate: float, where: str) -> float:
        s = self.settings
        if s.noise_multiplier is not None:
            return s.noise_multiplier
        if self.history:
            return self.history[0][0]
        if s.planned_rounds is None or s.epsilon is None:
            raise ValueError(
                f"{where}: a noise multiplier chosen from the budget needs epsilon and planned_rounds"
            )
        return noise_for_budget(
            s.epsilon,
            steps * s.planned_rounds,
            delta=s.delta,
            sample_rate=sample_rate,
            accountant=s.accountant,
        )

    def check_budget(self, steps: int, sample_rate: float, where: str) -> None:
        """ValueError naming ``where`` when ``steps`` more steps at ``sample_rate`` would take this site
        beyond its ε budget; changes nothing (:meth:`calibrate` first sets the noise multiplier)."""
        budget = self.settings.epsilon
        if budget is None:
            return
        after = self.epsilon(steps, sample_rate)
        if after > budget:
            raise ValueError(
                f"{where}: {steps} DP-SGD steps would take this site's epsilon to {after:.3f} > its budget {budget}"
            )

    def loader(self, dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
        """This round's Poisson batches of expected size ``batch_size`` (None for an empty one), drawn
        with :attr:`noise_key` (None = a fresh OS key)."""
        return poisson_loader(dataset, batch_size, key=self.noise_key, num_workers=num_workers)

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, expected_batch_size: int
    ) -> tuple[nn.Module, torch.optim.Optimizer, None]:
        """(per-sample-gradient module, DP optimiser, None) for one round; close with :meth:`finish`."""
        from opacus import GradSampleModule
        from opacus.validators import ModuleValidator

        from jipfed.privacy.dp_optimizer import SecureDPOptimizer

        ModuleValidator.validate(model, strict=True)
        module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        dp_optimizer = SecureDPOptimizer(
            optimizer,
            noise_multiplier=self._noise(),
            max_grad_norm=self.settings.max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            noise=ChaChaNormal(self.noise_key),
            views=self.settings.augment_views,
        )
        return module, dp_optimizer, None

    def finish(self, module: nn.Module, steps: int, sample_rate: float) -> float:
        """Detach opacus' hooks, record ``steps`` at ``sample_rate``; the site's ε after this round."""
        close = getattr(module, "_close", None)
        if close is not None:
            close()
        if steps:
            self.history.append((self._noise(), float(sample_rate), int(steps)))
        return self.epsilon()

    def history_tensor(self) -> torch.Tensor:
        """The history as a float64 (phases, 3) tensor (kept with the site's state between rounds)."""
        return torch.tensor(self.history, dtype=torch.float64).reshape(-1, 3)

    def load_history(self, tensor: torch.Tensor) -> None:
        if tensor.ndim != 2 or tensor.shape[1] != 3:
            raise ValueError(f"DP-SGD history must be (phases, 3), got {tuple(tensor.shape)}")
        self.history = [(float(z), float(q), int(t)) for z, q, t in tensor.tolist()]
