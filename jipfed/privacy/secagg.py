"""Secure aggregation by pairwise additive masks: the central learns the sum of the sites' updates only.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017
(https://eprint.iacr.org/2017/281), without its secret-shared recovery: a site that drops out after
key agreement makes the attempt fail and the step is retried with the remaining sites and fresh keys
(:class:`SecAggRound`).

Per attempt, each site makes an X25519 key pair and posts the public key. Every pair of sites
(i, j) derives the same 32-byte seed: HKDF-SHA256 over their X25519 shared secret, bound to the
experiment, round, attempt and both site ids. ChaCha20 expands the seed into one 64-bit mask per
element. Site i adds the masks of every peer j > i and subtracts those of j < i, so the masks
cancel exactly in the sum modulo 2**64 over the attempt's sites.

Values travel in fixed point: ``round(x * 2**fraction_bits)`` as two's complement in the 64-bit
ring, after clamping to ``[-value_bound, value_bound]``. A site multiplies its delta by its weight
(sample count) first and appends the weight itself as the last element, so the central learns only
the weighted sum and the total weight and divides; no site's count is revealed.
:meth:`~jipfed.privacy.settings.SecureAggregation.check_capacity` refuses settings whose sum could
overflow. Error of the mean: at most ``n / 2 * 2**-fraction_bits / total weight`` per element.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from jipfed.privacy.settings import SecureAggregation

PUBLIC_KEY_BYTES = 32


def new_private_key() -> X25519PrivateKey:
    """A fresh X25519 key for one attempt (never reused across attempts)."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes a site posts."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _peer_key(site: str, raw: bytes) -> X25519PublicKey:
    if not isinstance(raw, bytes) or len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"public key of site {site!r} must be {PUBLIC_KEY_BYTES} raw bytes")
    return X25519PublicKey.from_public_bytes(raw)


def pair_seed(
    own: X25519PrivateKey, own_site: str, peer_site: str, peer_public: bytes, context: str
) -> bytes:
    """The 32-byte seed sites ``own_site`` and ``peer_site`` share in ``context`` (module docstring)."""
    shared = own.exchange(_peer_key(peer_site, peer_public))
    low, high = sorted((own_site, peer_site))
    info = f"jipfed-secagg-v1|{context}|{low}|{high}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def mask_stream(seed: bytes, n: int) -> np.ndarray:
    """``n`` pseudo-random uint64 values: ChaCha20 keystream under ``seed`` (nonce 0; one seed, one use)."""
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * n)), dtype="<u8").astype(np.uint64, copy=False)


def encode_fixed(values: np.ndarray, settings: SecureAggregation) -> np.ndarray:
    """float values -> two's complement fixed point in uint64 (clamped to ±value_bound)."""
    return _encode_inplace(np.array(values, dtype=np.float64), settings)


def _encode_inplace(scaled: np.ndarray, settings: SecureAggregation) -> np.ndarray:
    """:func:`encode_fixed` of a float64 array this module owns (clamped, scaled and rounded in place)."""
    np.clip(scaled, -settings.value_bound, settings.value_bound, out=scaled)
    scaled *= 2.0**settings.fraction_bits
    np.rint(scaled, out=scaled)
    return scaled.astype(np.int64).view(np.uint64)


def decode_fixed(ring: np.ndarray, settings: SecureAggregation) -> np.ndarray:
    """Inverse of :func:`encode_fixed` (of a sum too, while it fits the signed ring)."""
    return ring.view(np.int64).astype(np.float64) / 2.0**settings.fraction_bits


def masked_vector(
    site: str,
    values: np.ndarray,
    weight: float,
    own: X25519PrivateKey,
    peers: Mapping[str, bytes],
    context: str,
    settings: SecureAggregation,
) -> np.ndarray:
    """``encode(weight * values ++ [weight])`` plus this site's pairwise masks, modulo 2**64.

    ``peers``: every other site of the attempt -> its public key (this site must not be in it).
    """
    if site in peers:
        raise ValueError(f"site {site!r} is among its own peers")
    values = np.asarray(values, dtype=np.float64)
    plain = np.empty(values.size + 1, dtype=np.float64)
    np.multiply(values.reshape(-1), weight, out=plain[:-1])
    plain[-1] = weight
    out = _encode_inplace(plain, settings)
    for peer in sorted(peers):
        mask = mask_stream(pair_seed(own, site, peer, peers[peer], context), out.size)
        # in place; uint64 arithmetic wraps modulo 2**64
        (np.add if site < peer else np.subtract)(out, mask, out=out)
    return out


def unmask_mean(masked: Sequence[np.ndarray], settings: SecureAggregation) -> tuple[np.ndarray, float]:
    """(weighted mean of the values, total weight) from every site's masked vector of one attempt."""
    if not masked:
        raise ValueError("no masked vectors to sum")
    total = np.zeros_like(masked[0])
    for vector in masked:
        if vector.shape != total.shape or vector.dtype != np.uint64:
            raise ValueError(f"masked vectors must all be uint64 of shape {total.shape}")
        np.add(total, vector, out=total)
    plain = decode_fixed(total, settings)
    weight = float(plain[-1])
    if not weight > 0:
        raise ValueError(f"the unmasked total weight is {weight}: a vector is missing or corrupt")
    return plain[:-1] / weight, weight


class AttemptFailed(Exception):
    """The attempt's masks cannot cancel: a site that agreed keys did not upload (it will be retried)."""


@dataclass
class SecAggRound:
    """The central's view of one round's secure aggregation, attempt by attempt.

    ``open_attempt(sites)`` starts an attempt; sites ``post_key``; once every key is in, each site
    gets :meth:`peers` and uploads with :meth:`post_masked`. :meth:`close` returns the mean of the
    attempt or, when a site that posted a key did not upload, records why and opens the next attempt
    without it (fresh keys: masked vectors of a failed attempt are never combined with another's).
    """

    experiment: str
    round: int
    settings: SecureAggregation
    attempt: int = 0
    sites: tuple[str, ...] = ()
    keys: dict[str, bytes] = field(default_factory=dict)
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    retries: list[dict[str, object]] = field(default_factory=list)

    @property
    def context(self) -> str:
        return f"{self.experiment}|round {self.round}|attempt {self.attempt}"

    def open_attempt(self, sites: Sequence[str]) -> None:
        if len(set(sites)) < 2:
            raise AttemptFailed(
                f"round {self.round}: secure aggregation needs at least 2 sites, got {list(sites)}"
            )
        self.sites, self.keys, self.masked = tuple(sorted(set(sites))), {}, {}

    def post_key(self, site: str, public: bytes) -> None:
        if site not in self.sites:
            raise ValueError(f"site {site!r} is not in attempt {self.attempt} of round {self.round}")
        _peer_key(site, public)
        self.keys[site] = public

    def peers(self, site: str) -> dict[str, bytes]:
        """The other sites' keys; ValueError until every site of the attempt posted its key."""
        waiting = sorted(set(self.sites) - set(self.keys))
        if waiting:
            raise ValueError(f"round {self.round} attempt {self.attempt}: waiting for the keys of {waiting}")
        return {s: k for s, k in self.keys.items() if s != site}

    def post_masked(self, site: str, vector: np.ndarray) -> None:
        if site not in self.keys:
            raise ValueError(f"site {site!r} posted no key in attempt {self.attempt} of round {self.round}")
        self.masked[site] = vector

    def close(self) -> tuple[np.ndarray, float]:
        """The attempt's weighted mean; AttemptFailed (and the next attempt opened) on a drop-out."""
        dropped = sorted(set(self.sites) - set(self.masked))
        if dropped:
            reason = f"site(s) {dropped} agreed keys but did not upload; retrying without them"
            self.retries.append({"attempt": self.attempt, "dropped": dropped, "reason": reason})
            remaining = [s for s in self.sites if s not in dropped]
            self.attempt += 1
            self.open_attempt(remaining)
            raise AttemptFailed(f"round {self.round}: {reason}")
        return unmask_mean([self.masked[s] for s in self.sites], self.settings)


def flatten(tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
    """The float tensors of ``tensors`` in name order as one float64 vector (integer tensors left out)."""
    parts = [
        t.detach().reshape(-1).double().numpy() for _, t in sorted(tensors.items()) if t.is_floating_point()
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(vector: np.ndarray, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten` with the shapes and dtypes of ``like``; integer tensors become zeros."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, t in sorted(like.items()):
        if t.is_floating_point():
            n = t.numel()
            out[name] = torch.from_numpy(vector[offset : offset + n].copy()).reshape(t.shape).to(t.dtype)
            offset += n
        else:
            out[name] = torch.zeros_like(t)
    if offset != vector.size:
        raise ValueError(f"vector has {vector.size} values, the tensors {offset}")
    return {name: out[name] for name in like}
