"""The maths of client-level DP (DP-FedAvg): clip each site's delta, sum, add Gaussian noise, adapt C.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018 (https://arxiv.org/abs/1710.06963); adaptive clipping: Andrew et al., NeurIPS 2021
(https://arxiv.org/abs/1905.03871). Only float tensors carry a delta; integer buffers
(``num_batches_tracked``) would reveal a site's batch count and are left at the global value.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Mapping

import torch

from jipfed.federation.update import UpdateSource


def site_delta(update: UpdateSource, global_weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float tensors of ``update`` as a delta from ``global_weights`` (float32 or wider), new tensors."""
    out: dict[str, torch.Tensor] = {}
    tensors = update.tensors
    for name, g in global_weights.items():
        if not g.is_floating_point():
            continue
        x = tensors[name].to(torch.promote_types(g.dtype, torch.float32), copy=True)  # never the site's
        out[name] = x.sub_(g) if update.manifest.kind == "weights" else x  # (maybe memory-mapped) tensor
    return out


def l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all tensors together (float64 sum of squares)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def clip_(tensors: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[float, bool]:
    """Scale ``tensors`` in place to L2 norm at most ``clip_norm``; (norm before, whether it was within)."""
    norm = l2_norm(tensors)
    if norm > clip_norm:
        scale = clip_norm / norm
        for t in tensors.values():
            t.mul_(scale)
    return norm, norm <= clip_norm


def noise_generator(key: bytes, label: str) -> torch.Generator:
    """A torch generator seeded from HMAC-SHA256(``key``, ``label``): reproducible for the key's holder only."""
    seed = int.from_bytes(hmac.new(key, label.encode("utf-8"), hashlib.sha256).digest()[:8], "little")
    return torch.Generator().manual_seed(seed & ((1 << 63) - 1))


def add_gaussian_(tensors: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> None:
    """Add N(0, std^2) to every element, in place, in name order (deterministic for one generator)."""
    if std <= 0:
        return
    for name in sorted(tensors):
        t = tensors[name]
        t.add_(torch.randn(t.shape, generator=generator, dtype=t.dtype), alpha=std)


def next_clip_norm(
    clip_norm: float,
    unclipped: int,
    n_sites: int,
    *,
    target_quantile: float,
    clip_lr: float,
    count_stddev: float,
    generator: torch.Generator,
) -> tuple[float, float]:
    """Geometric update of C (Andrew et al.): (new C, the noised fraction of unclipped updates)."""
    noisy = (
        unclipped + count_stddev * float(torch.randn((), generator=generator, dtype=torch.float64))
    ) / n_sites
    return clip_norm * math.exp(-clip_lr * (noisy - target_quantile)), noisy
