"""Gaussian noise from a cryptographically secure source (ChaCha20 keyed from the OS), no opacus needed.

Used by DP-SGD at a site (:mod:`jipfed.privacy.dp_optimizer`) and by a site's client-level noise share
with secure aggregation (:mod:`jipfed.privacy.secure_dp`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms


class ChaChaNormal:
    """Standard normal float64 samples from a ChaCha20 keystream (Box-Muller on 53-bit uniforms).

    ``key`` None = 32 bytes of OS randomness: a cryptographically secure source, unlike torch's
    Mersenne Twister. A fixed key gives a reproducible stream (tests only).
    """

    def __init__(self, key: bytes | None = None) -> None:
        key = os.urandom(32) if key is None else key
        if len(key) != 32:
            raise ValueError(f"the ChaCha20 noise key must be 32 bytes, got {len(key)}")
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def __call__(self, n: int) -> torch.Tensor:
        pairs = (n + 1) // 2
        words = torch.frombuffer(bytearray(self._stream.update(bytes(16 * pairs))), dtype=torch.int64)
        uniform = ((words >> 11) & ((1 << 53) - 1)).double().add_(0.5).mul_(2.0**-53)  # in (0, 1)
        u1, u2 = uniform[:pairs], uniform[pairs:]
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = (2.0 * math.pi) * u2
        return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]


def secure_normal(std: float, reference: torch.Tensor, draw: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """N(0, std^2) noise shaped like ``reference``: the sum of 4 draws / 2, opacus' defence against
    floating-point attacks on Gaussian noise (Holohan et al., https://arxiv.org/abs/2107.10138)."""
    n = reference.numel()
    total = draw(n) + draw(n) + draw(n) + draw(n)
    return (total * (std / 2.0)).to(reference.dtype).view(reference.shape).to(reference.device)
