"""Client-level DP with secure aggregation over the wire: the noise is split across the sites.

Each site of a secure-aggregation attempt with ``n`` sites clips its delta to L2 norm C (the whole
float vector), adds its share N(0, (z C)^2 / n) drawn from ChaCha20 keyed with OS randomness
(:class:`jipfed.privacy.secure_noise.ChaChaNormal`, never the experiment seed the central knows), and
masks it with weight 1 (uniform: a sample count would change the sensitivity). The masked sum the
central unmasks is ``sum of clipped deltas + N(0, (z C)^2)``: the noise DP-FedAvg adds at a trusted
central, so the same accountant and ledger (:class:`~jipfed.federation.strategies.dp_fedavg.DPFedAvg`)
apply, and the central never holds an un-noised sum.

A drop-out after key agreement fails the attempt; the retry's sites recompute their share for the
smaller ``n``, so the complete attempt's noise is again std ``z C``. Each masked upload declares its
share (:func:`noise_record`); the central refuses an upload whose share does not match the attempt
(:func:`check_share`) and refuses to release a sum whose shares add up to less than ``z C``
(:func:`total_noise`), so the accountant's ``z`` is never larger than the noise actually added.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from jipfed.federation.experiment import ExperimentConfig
    from jipfed.federation.strategies.dp_fedavg import DPFedAvg

#: Relative tolerance of a declared noise std (float round trip through JSON).
STD_RTOL = 1e-9


@dataclass(frozen=True)
class NoiseShare:
    """What the sites of an attempt add: clip to ``clip_norm`` (C), noise ``noise_multiplier * C`` in all."""

    clip_norm: float
    noise_multiplier: float

    def share_std(self, n_sites: int) -> float:
        """One site's noise std among ``n_sites``: ``z C / sqrt(n)``."""
        if n_sites < 1:
            raise ValueError(f"a noise share needs at least one site, got {n_sites}")
        return self.noise_multiplier * self.clip_norm / math.sqrt(n_sites)


def noise_share(config: ExperimentConfig) -> NoiseShare | None:
    """The experiment's share rule (the noise multiplier its DP-FedAvg strategy accounts), None without
    client-level DP or without secure aggregation."""
    privacy = config.privacy or {}
    if not privacy.get("client_dp") or not privacy.get("secure_aggregation"):
        return None
    from jipfed.federation.strategies.dp_fedavg import DPFedAvg

    strategy = config.make_strategy()
    if not isinstance(strategy, DPFedAvg):
        raise ValueError(
            f"experiment {config.name!r}: client_dp is set but the strategy is {strategy.name!r}"
        )
    return NoiseShare(clip_norm=strategy.clip_norm, noise_multiplier=strategy.noise_multiplier)


def clip_values(values: np.ndarray, clip_norm: float) -> np.ndarray:
    """``values`` scaled to L2 norm at most ``clip_norm`` (float64, a new array)."""
    out = np.array(values, dtype=np.float64)
    norm = float(np.linalg.norm(out))
    if norm > clip_norm:
        out *= clip_norm / norm
    return out


def noise_record(share: NoiseShare, n_sites: int) -> dict[str, Any]:
    """The ``noise`` field of a masked upload's manifest: what this site added."""
    return {"clip_norm": share.clip_norm, "shares": n_sites, "std": share.share_std(n_sites)}


def add_share(values: np.ndarray, share: NoiseShare, n_sites: int, key: bytes | None = None) -> np.ndarray:
    """``values`` (clipped) plus this site's share of the noise, from a cryptographically secure source.

    ``key``: the ChaCha20 key (None = 32 bytes from the OS; tests only fix it).
    """
    import torch

    from jipfed.privacy.secure_noise import ChaChaNormal, secure_normal

    reference = torch.from_numpy(np.asarray(values, dtype=np.float64))
    noise = secure_normal(share.share_std(n_sites), reference, ChaChaNormal(key))
    return reference.numpy() + noise.numpy()


def check_share(declared: object, share: NoiseShare | None, n_sites: int) -> None:
    """ValueError unless a masked upload's ``noise`` field is what the attempt's sites must add."""
    if share is None:
        if declared is not None:
            raise ValueError(
                "noise must be null: this experiment has no client-level DP with secure aggregation"
            )
        return
    expected = noise_record(share, n_sites)
    if not isinstance(declared, Mapping) or set(declared) != set(expected):
        raise ValueError(f"noise must be an object with the fields {sorted(expected)}, got {declared!r}")
    if declared["shares"] != n_sites or not all(
        isinstance(declared[k], (int, float)) and math.isclose(declared[k], expected[k], rel_tol=STD_RTOL)
        for k in ("clip_norm", "std")
    ):
        raise ValueError(
            f"noise {dict(declared)} does not match this attempt's share {expected} "
            f"({n_sites} sites, noise multiplier {share.noise_multiplier:g})"
        )


def total_noise(manifests: Mapping[str, Mapping[str, Any]], share: NoiseShare, where: str) -> dict[str, Any]:
    """The noise in the unmasked sum from the sites' declared shares; ValueError when below ``z C``.

    Returns the round record's ``noise`` entry: shares, each share's std, the total std and ``z C``.
    """
    stds = {site: float((m.get("noise") or {}).get("std", 0.0)) for site, m in manifests.items()}
    total = math.sqrt(sum(s * s for s in stds.values()))
    planned = share.noise_multiplier * share.clip_norm
    if total < planned * (1.0 - STD_RTOL):
        raise ValueError(
            f"{where}: the sites' noise shares {stds} add up to std {total:.6g} < z C = {planned:.6g}; "
            "the sum is not released (the accountant assumes z C)"
        )
    return {"shares": len(stds), "share_std": stds, "total_std": total, "planned_std": planned}


def check_budget(strategy: DPFedAvg, round_: int) -> None:
    """PrivacyBudgetExceeded when the DP strategy's next release would spend beyond its budget."""
    from jipfed.federation.strategies.dp_fedavg import PrivacyBudgetExceeded

    spent = strategy.epsilon_after(strategy.releases + 1)
    if strategy.dp.epsilon is not None and spent > strategy.dp.epsilon:
        raise PrivacyBudgetExceeded(
            f"round {round_}: release {strategy.releases + 1} would spend epsilon {spent:.3f} > budget "
            f"{strategy.dp.epsilon}; the sites' noised sum is not unmasked, the experiment must stop"
        )
