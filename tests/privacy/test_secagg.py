"""Secure aggregation: masks cancel, one masked vector says nothing about its values, drop-outs are retried."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from federation.helpers import update
from scipy import stats

from jipfed.privacy import secagg
from jipfed.privacy.secure_round import SiteNoise, secure_mean_delta
from jipfed.privacy.settings import SecureAggregation

SETTINGS = SecureAggregation(fraction_bits=24, value_bound=1000.0)
SITES = ("site-a", "site-b", "site-c", "site-d")


def keys(sites: tuple[str, ...] = SITES) -> dict[str, object]:
    return {s: secagg.new_private_key() for s in sites}


def mask_all(values: dict[str, np.ndarray], weights: dict[str, float], context: str = "exp|r0|a0") -> list:
    private = keys(tuple(values))
    public = {s: secagg.public_bytes(k) for s, k in private.items()}
    return [
        secagg.masked_vector(
            s,
            values[s],
            weights[s],
            private[s],
            {p: b for p, b in public.items() if p != s},
            context,
            SETTINGS,
        )
        for s in values
    ]


def test_unmasked_sum_is_the_weighted_mean_within_the_fixed_point_error() -> None:
    rng = np.random.default_rng(0)
    values = {s: rng.normal(0, 0.01, 50_000) for s in SITES}
    weights = {"site-a": 120.0, "site-b": 7.0, "site-c": 1.0, "site-d": 33.0}
    mean, total = secagg.unmask_mean(mask_all(values, weights), SETTINGS)
    plain = sum(weights[s] * values[s] for s in SITES) / sum(weights.values())
    assert total == sum(weights.values())
    bound = len(SITES) * 0.5 * 2.0**-SETTINGS.fraction_bits / total
    assert np.max(np.abs(mean - plain)) <= bound
    assert np.max(np.abs(mean - plain)) > 0  # it is fixed point, not a copy of the floats


def test_a_masked_vector_is_independent_of_its_values() -> None:
    rng = np.random.default_rng(1)
    n = 20_000
    plain = {s: rng.normal(0, 1, n) for s in SITES}
    zeros = {s: np.zeros(n) for s in SITES}
    weights = dict.fromkeys(SITES, 1.0)
    masked = mask_all(plain, weights)[0][:-1]
    masked_zero = mask_all(zeros, weights)[0][:-1]
    as_unit = masked.astype(np.float64) / 2.0**64
    # uniform over the ring whatever the values were
    assert stats.kstest(as_unit, "uniform").pvalue > 1e-3
    assert stats.ks_2samp(as_unit, masked_zero.astype(np.float64) / 2.0**64).pvalue > 1e-3
    # and uncorrelated with them (also in the low bits, where the fixed-point value sits)
    assert abs(np.corrcoef(plain["site-a"], as_unit)[0, 1]) < 0.03
    low = (masked & np.uint64(0xFFFFFFFF)).astype(np.float64)
    assert abs(np.corrcoef(plain["site-a"], low)[0, 1]) < 0.03
    # the encoded (unmasked) vector is, of course, perfectly correlated: the test can fail
    encoded = secagg.encode_fixed(plain["site-a"], SETTINGS).view(np.int64).astype(np.float64)
    assert np.corrcoef(plain["site-a"], encoded)[0, 1] > 0.99


def test_pair_seeds_agree_and_depend_on_the_context() -> None:
    a, b = secagg.new_private_key(), secagg.new_private_key()
    ab = secagg.pair_seed(a, "site-a", "site-b", secagg.public_bytes(b), "ctx")
    assert ab == secagg.pair_seed(b, "site-b", "site-a", secagg.public_bytes(a), "ctx")
    assert ab != secagg.pair_seed(a, "site-a", "site-b", secagg.public_bytes(b), "ctx2")
    with pytest.raises(ValueError, match="public key of site 'site-b' must be 32 raw bytes"):
        secagg.pair_seed(a, "site-a", "site-b", b"short", "ctx")


def test_values_are_clamped_to_the_bound() -> None:
    ring = secagg.encode_fixed(np.array([5000.0, -5000.0, 1.5]), SETTINGS)
    assert list(secagg.decode_fixed(ring, SETTINGS)) == [1000.0, -1000.0, 1.5]


def updates(round_: int = 0) -> list:
    g = torch.Generator().manual_seed(3)
    return [
        update(
            {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g), "n": torch.tensor(i)},
            site=s,
            round=round_,
            n_samples=10 * (i + 1),
        )
        for i, s in enumerate(SITES)
    ]


GLOBAL = {"w": torch.zeros(6, 5), "b": torch.zeros(5), "n": torch.tensor(0)}


def plain_mean(ups: list) -> dict[str, torch.Tensor]:
    total = sum(u.n_samples for u in ups)
    return {k: sum(u.tensors[k] * u.n_samples for u in ups) / total for k in ("w", "b")}


def test_a_round_through_masks_gives_the_plain_weighted_mean() -> None:
    ups = updates()
    mean, protocol = secure_mean_delta(ups, GLOBAL, SETTINGS, experiment="exp1", round=0)
    expected = plain_mean(ups)
    assert all(torch.allclose(mean[k], expected[k], atol=1e-6) for k in ("w", "b"))
    assert int(mean["n"]) == 0 and protocol.attempt == 0 and protocol.retries == []


def test_a_site_that_drops_after_key_agreement_makes_the_round_retry_without_it() -> None:
    ups = updates()
    mean, protocol = secure_mean_delta(
        ups, GLOBAL, SETTINGS, experiment="exp1", round=0, drop_after_keys={"site-c"}
    )
    assert protocol.attempt == 1 and protocol.sites == ("site-a", "site-b", "site-d")
    assert protocol.retries == [
        {
            "attempt": 0,
            "dropped": ["site-c"],
            "reason": "site(s) ['site-c'] agreed keys but did not upload; retrying without them",
        }
    ]
    expected = plain_mean([u for u in ups if u.manifest.site != "site-c"])
    assert all(torch.allclose(mean[k], expected[k], atol=1e-6) for k in ("w", "b"))


def test_without_the_dropped_site_the_first_attempt_cannot_be_unmasked() -> None:
    protocol = secagg.SecAggRound(experiment="exp1", round=0, settings=SETTINGS)
    protocol.open_attempt(SITES)
    private = keys()
    for s, k in private.items():
        protocol.post_key(s, secagg.public_bytes(k))
    values = np.ones(100)
    vectors = {
        s: secagg.masked_vector(s, values, 1.0, private[s], protocol.peers(s), protocol.context, SETTINGS)
        for s in SITES[:3]
    }
    for s, v in vectors.items():
        protocol.post_masked(s, v)
    with pytest.raises(secagg.AttemptFailed, match=r"\['site-d'\] agreed keys but did not upload"):
        protocol.close()
    total = sum(vectors.values())  # what the central holds: garbage, not 3 * ones
    assert not np.allclose(secagg.decode_fixed(total, SETTINGS)[:-1], 3.0)
    with pytest.raises(ValueError, match=r"waiting for the keys of \['site-a', 'site-b', 'site-c'\]"):
        protocol.peers("site-a")  # the next attempt needs fresh keys


def test_client_dp_noise_split_across_sites_adds_up_to_z_times_c() -> None:
    big = {"w": torch.zeros(40_000)}
    ups = [update({"w": torch.zeros(40_000)}, site=s) for s in SITES]
    noise = SiteNoise(clip_norm=0.5, noise_multiplier=2.0, generator=torch.Generator().manual_seed(0))
    mean, _ = secure_mean_delta(ups, big, SETTINGS, experiment="exp1", round=1, noise=noise)
    # sum has std z*C; the mean (equal weights) z*C/n
    assert float(mean["w"].std()) == pytest.approx(2.0 * 0.5 / len(SITES), rel=0.03)
