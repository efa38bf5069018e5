"""The accountant against opacus' own accountants and against the closed form of the Gaussian RDP."""

from __future__ import annotations

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from jipfed.privacy.accountant import (
    epsilon_after,
    gaussian_rdp_epsilon,
    noise_for_budget,
    update_noise_multiplier,
)


@pytest.mark.parametrize(("z", "releases", "delta"), [(1.0, 10, 1e-5), (2.5, 40, 1e-5), (0.7, 3, 1e-6)])
def test_rdp_epsilon_matches_opacus_stepping_round_by_round(z: float, releases: int, delta: float) -> None:
    accountant = RDPAccountant()
    for _ in range(releases):
        accountant.step(noise_multiplier=z, sample_rate=1.0)
    expected = accountant.get_epsilon(delta=delta)
    assert epsilon_after(z, releases, delta=delta) == pytest.approx(expected, rel=1e-12)
    # an independent derivation: RDP of the Gaussian mechanism a*T/(2 z^2), converted as opacus does
    assert gaussian_rdp_epsilon(z, releases, delta) == pytest.approx(expected, rel=1e-9)


def test_prv_epsilon_matches_opacus_and_is_below_rdp() -> None:
    accountant = PRVAccountant()
    accountant.history = [(1.5, 1.0, 20)]
    prv = epsilon_after(1.5, 20, delta=1e-5, accountant="prv")
    assert prv == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
    assert prv < epsilon_after(1.5, 20, delta=1e-5)


def test_epsilon_grows_with_releases_and_is_zero_for_none() -> None:
    values = [epsilon_after(2.0, t, delta=1e-5) for t in range(4)]
    assert values[0] == 0.0 and values == sorted(values) and len(set(values)) == 4
    with pytest.raises(ValueError, match="releases must be an integer"):
        epsilon_after(2.0, -1, delta=1e-5)


def test_noise_for_budget_is_opacus_search_and_keeps_the_budget() -> None:
    z = noise_for_budget(8.0, 10, delta=1e-5)
    assert z == get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=1.0, steps=10)
    assert 7.9 <= epsilon_after(z, 10, delta=1e-5) <= 8.0


def test_adaptive_clipping_update_noise() -> None:
    # Andrew et al.: z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2; sigma_b = 2z costs ~3 % more update noise
    assert update_noise_multiplier(1.0, 2.0) == pytest.approx((1 - 1 / 16) ** -0.5)
    with pytest.raises(ValueError, match="clip_count_stddev > noise_multiplier / 2"):
        update_noise_multiplier(1.0, 0.5)
