"""Poisson-sampled batches for DP-SGD, drawn from a secret ChaCha20 stream.

The accountant's ε for sample rate q = batch / cases assumes Poisson sampling: every step takes each
training case independently with probability q, so a batch's size varies and may be 0, and nobody
who sees the updates knows which cases a step used. Shuffled fixed-size batches are a different
mechanism, for which that ε is not proven (Chua et al., "How Private are DP-SGD Implementations?",
ICML 2024); and a shuffle seeded by the experiment seed, which the central sets, tells the central
which cases shared a batch. Here the draws come from ChaCha20 keyed with 32 bytes of OS randomness
(tests fix the key), never from the experiment seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from jipfed.privacy.secure_noise import ChaChaUniform

#: ChaCha20 nonce of the sampling stream (the noise stream of the same key uses the zero nonce).
SAMPLING_NONCE = b"poisson-batches!"


def dp_sample_rate(batch_size: int, cases: int) -> float:
    """DP-SGD's sample rate q: each case's chance to be in a step's Poisson batch (1 when the batch
    would hold every case)."""
    return min(1.0, batch_size / cases)


class PoissonBatches(Sampler[list[int]]):
    """``steps`` batches per pass, each case in a batch with probability ``sample_rate``, independently."""

    def __init__(self, cases: int, sample_rate: float, steps: int, draw: ChaChaUniform) -> None:
        if cases < 1 or steps < 1 or not 0.0 < sample_rate <= 1.0:
            raise ValueError(
                f"Poisson sampling needs cases >= 1, steps >= 1 and 0 < sample rate <= 1, got "
                f"{cases}, {steps}, {sample_rate}"
            )
        self.cases, self.sample_rate, self.steps, self._draw = cases, sample_rate, steps, draw

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield (self._draw.uniform(self.cases) < self.sample_rate).nonzero().flatten().tolist()


def collate_or_none(items: list[Any]) -> Any:
    """The default collation; None for an empty batch (a step that only adds noise)."""
    return default_collate(items) if items else None


def poisson_loader(
    dataset: Dataset, batch_size: int, *, key: bytes | None = None, num_workers: int = 0
) -> DataLoader:
    """DataLoader of Poisson batches with expected size ``batch_size`` (sample rate batch / cases) and
    ceil(cases / batch) steps per pass, as many as the shuffled loader; an empty batch comes as None."""
    cases = len(dataset)  # type: ignore[arg-type]
    rate = dp_sample_rate(batch_size, cases)
    batches = PoissonBatches(cases, rate, math.ceil(cases / batch_size), ChaChaUniform(key, SAMPLING_NONCE))
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_or_none,
        num_workers=num_workers,
        persistent_workers=False,
    )
