"""Ed25519 signatures of site updates and global models (detached; ``cryptography``).

What is signed is a canonical JSON *statement* naming what the bytes are for, so a signature
cannot be moved to another experiment, round, step, config or site::

    {"purpose": "jipfed-update-v1" | "jipfed-global-v1", "experiment", "round", "step",
     "site", "config_hash", "manifest_sha256", "payload_sha256"}

``manifest_sha256`` is the sha256 of the manifest's canonical JSON (so ``n_samples`` and metrics are
covered), ``payload_sha256`` the manifest's ``sha256`` of the payload. Signatures travel and are
stored as base64 (``updates/<site>.sig``, ``global.sig`` next to the objects they sign).

Keys: a site keeps its private key (PEM, PKCS#8) in its own secret store and registers the raw
public key with the central (``jipfed site-token --public-key``). The central's key is derived from
its site token secret (HKDF-SHA256), so it needs no new secret; sites pin its public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from jipfed.storage.base import canonical_json

UPDATE_PURPOSE = "jipfed-update-v1"
GLOBAL_PURPOSE = "jipfed-global-v1"
_CENTRAL_KEY_INFO = b"jipfed-central-signing-key-v1"


class SignatureInvalid(ValueError):
    """A signature is missing, malformed, or does not verify; ``code`` is ``unsigned`` or ``bad_signature``."""

    def __init__(self, code: str, detail: str) -> None:
        self.code = code
        super().__init__(detail)


def statement(
    purpose: str,
    *,
    experiment: str,
    round: int,
    step: int,
    site: str,
    config_hash: str,
    manifest_text: bytes,
    payload_sha256: str | None,
) -> bytes:
    """The bytes a signature covers (canonical JSON); ``manifest_text`` is the manifest as sent."""
    return canonical_json(
        {
            "purpose": purpose,
            "experiment": experiment,
            "round": round,
            "step": step,
            "site": site,
            "config_hash": config_hash,
            "manifest_sha256": hashlib.sha256(manifest_text).hexdigest(),
            "payload_sha256": payload_sha256,
        }
    )


def _manifest_statement(purpose: str, manifest: Mapping[str, Any], step: int, text: bytes) -> bytes:
    return statement(
        purpose,
        experiment=str(manifest.get("experiment")),
        round=int(manifest.get("round", -1)),
        step=step,
        site=str(manifest.get("site")),
        config_hash=str(manifest.get("config_hash")),
        manifest_text=text,
        payload_sha256=manifest.get("sha256"),
    )


def update_statement(manifest: Mapping[str, Any], manifest_text: str | bytes, step: int) -> bytes:
    """What a site signs for its update: the manifest's own identity fields plus the plan step."""
    text = manifest_text.encode("utf-8") if isinstance(manifest_text, str) else manifest_text
    return _manifest_statement(UPDATE_PURPOSE, manifest, step, text)


def global_statement(manifest: Mapping[str, Any], step: int) -> bytes:
    """What the central signs for the model a step starts from (its manifest as canonical JSON)."""
    return _manifest_statement(GLOBAL_PURPOSE, manifest, step, canonical_json(dict(manifest)))


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (ValueError for anything else)."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the private key is not an Ed25519 key")
    return key


def public_key_raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_key(data: bytes) -> bytes:
    """Raw 32-byte public key from PEM, base64 text or raw bytes (ValueError otherwise)."""
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(text)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the public key is not an Ed25519 key")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if len(data) == 32:
        return data
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != 32:
        raise ValueError("a public key must be PEM, base64 of 32 raw bytes, or 32 raw bytes")
    return raw


def central_signing_key(secret: str) -> Ed25519PrivateKey:
    """The central's signing key, derived from its site token secret."""
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_CENTRAL_KEY_INFO).derive(
        secret.encode("utf-8")
    )
    return Ed25519PrivateKey.from_private_bytes(seed)


def sign(key: Ed25519PrivateKey, message: bytes) -> str:
    """Base64 Ed25519 signature of ``message``."""
    return base64.b64encode(key.sign(message)).decode("ascii")


def verify(public_raw: bytes, message: bytes, signature: str | None, what: str) -> None:
    """Raise :class:`SignatureInvalid` unless ``signature`` (base64) signs ``message`` under ``public_raw``."""
    if not signature:
        raise SignatureInvalid("unsigned", f"{what} is not signed")
    try:
        raw = base64.b64decode(signature, validate=True)
        Ed25519PublicKey.from_public_bytes(public_raw).verify(raw, message)
    except (binascii.Error, ValueError, InvalidSignature):
        raise SignatureInvalid(
            "bad_signature", f"{what}: the signature does not verify with the registered key"
        ) from None
