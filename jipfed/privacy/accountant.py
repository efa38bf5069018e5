"""(ε, δ) accounting of repeated Gaussian releases with opacus' accountants (RDP or PRV).

Results are cached per process (pure functions of their arguments): the experiment config computes
them whenever it is loaded.

One *release* is one noised aggregate the central publishes (client level: one round; a retried
round is a second release) or one noised DP-SGD step (sample level). Releases are composed with
sampling rate ``sample_rate``: 1 for client-level DP here (every selected site takes part in every
round; no amplification by sub-sampling is claimed).

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with
Adaptive Clipping", NeurIPS 2021, Thm. 1) releases the noised count of unclipped updates too; with
count noise ``sigma_b`` the update noise multiplier ``z_delta = (z**-2 - (2 sigma_b)**-2)**-1/2``
gives the pair the privacy of one Gaussian release with multiplier ``z``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator

import numpy as np


def _accountant(kind: str, noise_multiplier: float, sample_rate: float, releases: int):  # noqa: ANN202
    from opacus.accountants import PRVAccountant, RDPAccountant

    classes = {"rdp": RDPAccountant, "prv": PRVAccountant}
    if kind not in classes:
        raise ValueError(f"accountant must be one of {sorted(classes)}, got {kind!r}")
    accountant = classes[kind]()
    accountant.history = [(float(noise_multiplier), float(sample_rate), int(releases))]
    return accountant


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence opacus' numeric warnings: PRV's log(1 - q) at q = 1, RDP's "optimal order" at extremes."""
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


@functools.lru_cache(maxsize=256)
def epsilon_after(
    noise_multiplier: float,
    releases: int,
    *,
    delta: float,
    sample_rate: float = 1.0,
    accountant: str = "rdp",
) -> float:
    """ε spent by ``releases`` Gaussian releases with ``noise_multiplier`` at ``delta`` (0 for none)."""
    if isinstance(releases, bool) or not isinstance(releases, int) or releases < 0:
        raise ValueError(f"releases must be an integer >= 0, got {releases!r}")
    if releases == 0:
        return 0.0
    with _quiet():
        return float(
            _accountant(accountant, noise_multiplier, sample_rate, releases).get_epsilon(delta=delta)
        )


@functools.lru_cache(maxsize=64)
def noise_for_budget(
    epsilon: float,
    releases: int,
    *,
    delta: float,
    sample_rate: float = 1.0,
    accountant: str = "rdp",
) -> float:
    """The smallest noise multiplier (opacus' search, ε tolerance 0.01) keeping ``releases`` within ``epsilon``."""
    from opacus.accountants.utils import get_noise_multiplier

    with _quiet():
        try:
            return float(
                get_noise_multiplier(
                    target_epsilon=epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=releases,
                    accountant=accountant,
                )
            )
        except ValueError as exc:
            raise ValueError(
                f"no noise multiplier reaches epsilon {epsilon} after {releases} releases: {exc}"
            ) from None


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """``z_delta`` of adaptive clipping (module docstring); ValueError unless ``2 sigma_b > z``."""
    if 2.0 * count_stddev <= noise_multiplier:
        raise ValueError(
            f"adaptive clipping needs clip_count_stddev > noise_multiplier / 2 ({noise_multiplier / 2:.4g}), "
            f"got {count_stddev}"
        )
    return (noise_multiplier**-2 - (2.0 * count_stddev) ** -2) ** -0.5


def gaussian_rdp_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Closed form for ``sample_rate = 1``: RDP ``a T / (2 z^2)`` converted as opacus does (Balle et al. 2020).

    An independent check of the RDP accountant, over the same orders opacus uses.
    """
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    best = math.inf
    for a in orders:
        rdp = a * releases / (2.0 * noise_multiplier**2)
        eps = rdp + math.log1p(-1.0 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return max(best, 0.0)
