"""One round of secure aggregation run in this process: every site's side and the central's, with retries.

What the round protocol will do across the wire (a site posts its key when it takes the step, gets
its peers' keys, masks, uploads; the central closes or retries the attempt) done here with
function calls, so the masking, the drop-out retry and their cost can be tested and measured
(``benchmarks/privacy.py``). With client-level DP the noise is split across the sites: each site
clips its delta to C and adds N(0, (z C)^2 / n) before masking, so the unmasked sum carries noise of
std z C and the central never holds an un-noised sum.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from jipfed.federation.update import UpdateSource
from jipfed.privacy import client_dp, secagg
from jipfed.privacy.settings import SecureAggregation


@dataclass(frozen=True)
class SiteNoise:
    """Client-level DP at the sites: clip to ``clip_norm``, add this site's share of std ``z * C``."""

    clip_norm: float
    noise_multiplier: float
    generator: torch.Generator


def site_vector(
    update: UpdateSource,
    global_weights: Mapping[str, torch.Tensor],
    n_sites: int,
    noise: SiteNoise | None,
) -> tuple[torch.Tensor, float]:
    """(this site's flattened delta, its weight): clipped and noised with ``noise``, weight 1 then."""
    delta = client_dp.site_delta(update, global_weights)
    if noise is None:
        return delta, float(update.manifest.n_samples)
    client_dp.clip_(delta, noise.clip_norm)
    client_dp.add_gaussian_(
        delta, noise.noise_multiplier * noise.clip_norm / math.sqrt(n_sites), noise.generator
    )
    return delta, 1.0


def secure_mean_delta(
    updates: Sequence[UpdateSource],
    global_weights: Mapping[str, torch.Tensor],
    settings: SecureAggregation,
    *,
    experiment: str,
    round: int,
    drop_after_keys: Collection[str] = (),
    noise: SiteNoise | None = None,
) -> tuple[dict[str, torch.Tensor], secagg.SecAggRound]:
    """The weighted mean delta of ``updates`` through masked vectors only; sites in ``drop_after_keys``
    post their key in the first attempt and then vanish (the attempt is retried without them).

    Returns the mean (integer tensors zero: they keep the global value) and the round with its retries.
    """
    by_site = {u.manifest.site: u for u in updates}
    protocol = secagg.SecAggRound(experiment=experiment, round=round, settings=settings)
    protocol.open_attempt(sorted(by_site))
    while True:
        private = {site: secagg.new_private_key() for site in protocol.sites}
        for site, key in private.items():
            protocol.post_key(site, secagg.public_bytes(key))
        for site in protocol.sites:
            if protocol.attempt == 0 and site in drop_after_keys:
                continue
            delta, weight = site_vector(by_site[site], global_weights, len(protocol.sites), noise)
            vector = secagg.masked_vector(
                site,
                secagg.flatten(delta),
                weight,
                private[site],
                protocol.peers(site),
                protocol.context,
                settings,
            )
            protocol.post_masked(site, vector)
        try:
            mean, _ = protocol.close()
        except secagg.AttemptFailed:
            continue
        return secagg.unflatten(mean, global_weights), protocol
