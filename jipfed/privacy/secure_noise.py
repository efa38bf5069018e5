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


class ChaChaUniform:
    """Uniform float64 samples in (0, 1) (53 bits each) from a ChaCha20 keystream.

    ``key`` None = 32 bytes of OS randomness: a cryptographically secure source, unlike torch's
    Mersenne Twister. A fixed key gives a reproducible stream (tests only); ``nonce`` (16 bytes) keeps
    two streams of one key apart.
    """

    def __init__(self, key: bytes | None = None, nonce: bytes = bytes(16)) -> None:
        key = os.urandom(32) if key is None else key
        if len(key) != 32:
            raise ValueError(f"the ChaCha20 noise key must be 32 bytes, got {len(key)}")
        self._stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()

    def uniform(self, n: int) -> torch.Tensor:
        if n == 0:
            return torch.empty(0, dtype=torch.float64)
        words = torch.frombuffer(bytearray(self._stream.update(bytes(8 * n))), dtype=torch.int64)
        return ((words >> 11) & ((1 << 53) - 1)).double().add_(0.5).mul_(2.0**-53)


class ChaChaNormal(ChaChaUniform):
    """Standard normal float64 samples from a ChaCha20 keystream (Box-Muller on 53-bit uniforms)."""

    def __call__(self, n: int) -> torch.Tensor:
        pairs = (n + 1) // 2
        uniform = self.uniform(2 * pairs)
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
