"""Client-level DP with secure aggregation over the wire: the noise is split across the sites.

The real endpoint on a loopback port, the product's client, store and aggregate step. The central
only ever holds masked vectors and the noised sum; the noise in the released mean has std
``z C / n`` per coordinate; ε in the round record is the accountant's.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as load_numpy
from safetensors.torch import load as load_torch

from jipfed.central.client import CentralRefused
from jipfed.federation.closing import aggregate_step
from jipfed.federation.dispatch import current_dispatch
from jipfed.federation.strategies.dp_fedavg import PrivacyBudgetExceeded
from jipfed.privacy import secagg, secagg_site, secagg_wire, secure_dp
from jipfed.privacy.accountant import epsilon_after
from jipfed.privacy.secure_dp import NoiseShare
from jipfed.tasks import site_model
from jipfed.tasks.identity import SiteIdentity
from jipfed.tasks.run import SiteRun
from privacy.wire import SETTINGS, SITES, new_key, run_site, site_updates, start

CLIP = 0.5
Z = 1.2
SHARE = NoiseShare(clip_norm=CLIP, noise_multiplier=Z)
CLIENT_DP = {"epsilon": None, "noise_multiplier": Z, "clip_norm": CLIP, "delta": 1e-5}


def noise_std_ok(residual: np.ndarray, expected: float) -> tuple[bool, str]:
    """Whether ``residual`` (independent N(0, s^2) values) has std ``expected`` within 6 standard errors.

    The sample std of m Gaussian values has relative standard error 1/sqrt(2m): with the tiny U-Net's
    tens of thousands of float values that is well under 1 %, so 6 standard errors (a false failure
    about once in 5e8 runs) still tells z C from z C * sqrt(n) (no split) or z C / sqrt(n) (one share).
    Fixed point (2**-24) and float32 rounding are orders of magnitude below the noise.
    """
    std = float(residual.std())
    tolerance = 6.0 / math.sqrt(2 * residual.size)
    return abs(
        std / expected - 1.0
    ) <= tolerance, f"std {std:.5f} vs {expected:.5f} (rel. tol. {tolerance:.4f})"


@pytest.mark.parametrize("drop_out", [False, True], ids=["all-sites", "one-drops-after-keys"])
def test_the_released_mean_carries_the_split_noise_and_its_epsilon(
    central, tmp_path: Path, drop_out: bool
) -> None:
    _, store, client = central
    exp_store = start(store, "dp1", client_dp=CLIENT_DP)
    start_weights, updates = site_updates(client("site-a"), exp_store)
    uploaders = SITES[:2] if drop_out else SITES
    if drop_out:  # site-c takes the work, posts its key, then dies: attempt 1 has two sites
        client("site-c").post_secagg_key("dp1", 0, 0, 0, new_key())
    with ThreadPoolExecutor(len(uploaders)) as pool:
        futures = [
            pool.submit(run_site, client(s), exp_store, s, updates[s], tmp_path / s, SHARE) for s in uploaders
        ]
        done = [f.result(timeout=60) for f in futures]
    assert all(d["complete"] and d["sites"] == list(uploaders) for d in done)
    n = len(uploaders)

    record = aggregate_step(exp_store, 0)
    assert record.included == uploaders
    stored = store.get_json(exp_store.layout.aggregate(0))
    # every upload of the complete attempt declared its share for n sites; together they make z C
    noise = stored["secure_aggregation"]["noise"]
    assert noise["shares"] == n and noise["total_std"] == pytest.approx(Z * CLIP)
    assert all(s == pytest.approx(Z * CLIP / math.sqrt(n)) for s in noise["share_std"].values())
    # epsilon per round and in total: the accountant's, the same fields as the central-noise path
    privacy = stored["privacy"]
    expected_eps = epsilon_after(Z, 1, delta=1e-5, accountant="rdp")
    assert privacy["epsilon_round"] == pytest.approx(expected_eps)
    assert privacy["epsilon_total"] == pytest.approx(expected_eps)
    assert (privacy["releases"], privacy["sites"], privacy["noise_multiplier"]) == (1, n, Z)
    assert privacy["clip_norm"] == CLIP and privacy["level"] == "client"

    # the released model: start + (sum of clipped deltas + N(0, (zC)^2)) / n
    clipped = sum(
        secure_dp.clip_values(secagg.flatten(load_torch(updates[s].payload)), CLIP) for s in uploaders
    )
    released = secagg.flatten(load_torch(store.get_bytes(exp_store.layout.global_model(1))))
    residual = released - secagg.flatten(start_weights) - clipped / n
    ok, text = noise_std_ok(residual, Z * CLIP / n)
    assert ok, text

    # what the central holds: masked vectors only; the sum it can form of the complete attempt is noised
    keys = store.list(exp_store.layout.round_prefix(0))
    assert not [k for k in keys if "/updates/" in k]
    masked = sorted(k for k in keys if k.endswith(".safetensors") and "/masked/" in k)
    assert len(masked) == (2 * n if drop_out else n)  # a failed attempt's vectors do not cancel
    complete = [k for k in masked if f"/a{1 if drop_out else 0}/" in k]
    ring = sum(load_numpy(store.get_bytes(k))[secagg_wire.MASKED_TENSOR] for k in complete)
    plain = secagg.decode_fixed(np.asarray(ring, dtype=np.uint64), SETTINGS)
    assert plain[-1] == n  # weight 1 per site: no sample count in the sum
    ok, text = noise_std_ok(plain[:-1] - clipped, Z * CLIP)
    assert ok, text


def test_the_site_upload_task_clips_and_adds_its_share(central, tmp_path: Path) -> None:
    """The site DAG's upload task (``site_model.upload``) reads the share rule from the work's config."""
    _, store, client = central
    exp_store = start(store, "dp4", client_dp=CLIENT_DP)
    _, updates = site_updates(client("site-a"), exp_store)

    def upload(site: str) -> dict:
        (item,) = client(site).pending_work_dicts()
        run_dir = tmp_path / site
        run = SiteRun(
            SiteIdentity(site_id=site, data_root=run_dir), run_dir, run_dir / "in", run_dir / "out", item
        )
        run.in_dir.mkdir(parents=True)
        run.out_dir.mkdir(parents=True)
        (run.in_dir / site_model.UPDATE_PAYLOAD).write_bytes(updates[site].payload)
        (run.in_dir / site_model.UPDATE_MANIFEST).write_text(updates[site].manifest.to_json())
        return site_model.upload(run, client(site))

    with ThreadPoolExecutor(len(SITES)) as pool:
        done = list(pool.map(upload, SITES))
    assert all(d["complete"] for d in done)
    prefix = secagg_wire.attempt_prefix(exp_store, 0, 0, 0)
    for site in SITES:
        noise = store.get_json(secagg_wire.masked_manifest_key(prefix, site))["noise"]
        assert noise == {"clip_norm": CLIP, "shares": 3, "std": pytest.approx(Z * CLIP / math.sqrt(3))}
    assert aggregate_step(exp_store, 0).included == SITES
    assert store.get_json(exp_store.layout.aggregate(0))["privacy"]["sites"] == 3


def test_an_upload_with_the_wrong_noise_share_is_refused(central) -> None:
    _, store, client = central
    exp_store = start(store, "dp2", client_dp=CLIENT_DP)
    _, updates = site_updates(client("site-a"), exp_store)
    for site in SITES:
        client(site).post_secagg_key("dp2", 0, 0, 0, new_key())
    a = client("site-a")
    status = a.secagg_status("dp2", 0, 0)
    config_hash = current_dispatch(exp_store).ticket.config_hash
    payload_a, manifest_a = updates["site-a"].payload, updates["site-a"].manifest.to_json()
    reasons = {}
    for name, share in (("no noise", None), ("half the noise", NoiseShare(CLIP, Z / 2))):
        update = secagg_site.site_update(payload_a, manifest_a, 1000, share)
        body = secagg_site.masked_upload(
            update, status, "site-a", 0, config_hash, secagg.new_private_key(), SETTINGS
        )
        with pytest.raises(CentralRefused) as refused:
            a.put_masked_update("dp2", 0, 0, 0, *body)
        assert refused.value.code == "rejected"
        reasons[name] = refused.value.detail
    assert "noise must be an object" in reasons["no noise"]
    assert "does not match this attempt's share" in reasons["half the noise"]
    update = secagg_site.site_update(payload_a, manifest_a, 1000, SHARE)
    body = secagg_site.masked_upload(
        update, status, "site-a", 0, config_hash, secagg.new_private_key(), SETTINGS
    )
    assert json.loads(body[1])["noise"]["std"] == pytest.approx(Z * CLIP / math.sqrt(3))
    assert a.put_masked_update("dp2", 0, 0, 0, *body)["site"] == "site-a"


def test_a_sum_with_less_noise_than_accounted_is_not_released() -> None:
    manifests = {"site-a": {"noise": secure_dp.noise_record(SHARE, 3)}, "site-b": {"noise": None}}
    with pytest.raises(ValueError, match="add up to std .* < z C"):
        secure_dp.total_noise(manifests, SHARE, "round 0")
    full = {s: {"noise": secure_dp.noise_record(SHARE, 2)} for s in ("site-a", "site-b")}
    assert secure_dp.total_noise(full, SHARE, "round 0")["total_std"] == pytest.approx(Z * CLIP)


def test_the_budget_is_checked_before_the_sum_is_unmasked() -> None:
    from jipfed.federation.experiment import ExperimentConfig
    from privacy.wire import TRAIN

    config = ExperimentConfig(
        name="dp3", sites=SITES, rounds=2, train=TRAIN, norm_bound_factor=None,
        privacy={"secure_aggregation": True, "client_dp": {"epsilon": 8.0}},
    )  # fmt: skip
    strategy = config.make_strategy()
    secure_dp.check_budget(strategy, 1)
    strategy.releases = 2  # both planned rounds released: a third would exceed the budget
    with pytest.raises(PrivacyBudgetExceeded, match="not unmasked"):
        secure_dp.check_budget(strategy, 2)


def test_clipping_scales_the_whole_vector_to_the_norm() -> None:
    values = np.array([3.0, 4.0])
    assert np.allclose(secure_dp.clip_values(values, 1.0), [0.6, 0.8])
    assert np.array_equal(secure_dp.clip_values(values, 10.0), values)
    noised = secure_dp.add_share(np.zeros(200_000), SHARE, 4, key=bytes(32))
    ok, text = noise_std_ok(noised, Z * CLIP / 2)
    assert ok, text
