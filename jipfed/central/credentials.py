"""Per-site credentials: a registry in the model store, one record per site, expiring and revocable.

``credentials/<site>.json`` holds the site's current key id, when it was issued, when it expires,
whether it is revoked, and (optionally) the site's Ed25519 public key that verifies its signed
updates (:mod:`jipfed.federation.signing`). A token (:mod:`jipfed.central.tokens`) carries the key
id and expiry inside its HMAC'd part; :func:`authenticate` accepts it only while the registry's
record has that key id, is not revoked and has not expired. Consequences:

* rotating a site (:func:`issue_credential` again) invalidates that site's old token only;
* revoking a site (:func:`revoke_credential`) refuses its token at once, no other site is touched;
* a legacy token (format 1, no expiry) is accepted only for a site without a record.

Central admin: ``jipfed site-token --store <model store> --site X [--days N] [--public-key FILE]``
and ``jipfed site-token --store <model store> --revoke X``.
"""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from jipfed.central.tokens import InvalidToken, TokenClaims, issue_token, verify_token
from jipfed.storage.base import ModelStore, ObjectNotFoundError, StoreError
from jipfed.storage.layout import validate_slug

CREDENTIALS_PREFIX = "credentials/"
DEFAULT_DAYS = 90
MAX_DAYS = 730
RECORD_FORMAT = 1
PUBLIC_KEY_BYTES = 32


class CredentialRefused(InvalidToken):
    """A well-formed token that is no longer valid; ``code`` is ``expired_token``, ``revoked_token``
    or ``rotated_token``."""

    def __init__(self, code: str, detail: str) -> None:
        self.code = code
        super().__init__(detail)


@dataclass(frozen=True)
class Credential:
    """A site's registry record (times are unix seconds)."""

    site: str
    key_id: str
    issued_at: int
    expires_at: int
    revoked: bool = False
    revoked_at: int | None = None
    public_key: str | None = None  # Ed25519 raw public key, base64
    format: int = RECORD_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Credential:
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            raise ValueError(f"unsupported credential record {data!r}")
        record = cls(**data)
        validate_slug(record.site, "site id")
        return record

    def public_key_bytes(self) -> bytes | None:
        return None if self.public_key is None else base64.b64decode(self.public_key)


def credential_key(site: str) -> str:
    return f"{CREDENTIALS_PREFIX}{validate_slug(site, 'site id')}.json"


def load_credential(store: ModelStore, site: str) -> Credential | None:
    """The site's record, or None when it has none (StoreError if the record is unreadable)."""
    try:
        data = store.get_json(credential_key(site))
    except ObjectNotFoundError:
        return None
    try:
        return Credential.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"credential record of site {site!r} is invalid: {exc}") from exc


def encode_public_key(raw: bytes) -> str:
    """Base64 of a raw Ed25519 public key (32 bytes; ValueError otherwise)."""
    if not isinstance(raw, bytes) or len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} raw bytes")
    return base64.b64encode(raw).decode("ascii")


def issue_credential(
    store: ModelStore,
    secret: str,
    site: str,
    *,
    days: float = DEFAULT_DAYS,
    public_key: bytes | None = None,
    now: float | None = None,
) -> tuple[str, Credential]:
    """Issue (or rotate) ``site``'s credential: a new key id replaces the old one. Returns (token, record).

    ``public_key`` (raw Ed25519) registers the key that verifies the site's signed updates; without
    it a rotation keeps the key registered before.
    """
    if not 0 < days <= MAX_DAYS:
        raise ValueError(f"days must be in (0, {MAX_DAYS}], got {days!r}")
    issued = int(time.time() if now is None else now)
    before = load_credential(store, site)
    key = encode_public_key(public_key) if public_key is not None else (before.public_key if before else None)
    record = Credential(
        site=validate_slug(site, "site id"),
        key_id=secrets.token_hex(8),
        issued_at=issued,
        expires_at=issued + int(days * 86400),
        public_key=key,
    )
    store.put_json(credential_key(site), record.to_dict(), overwrite=True)
    return issue_token(secret, site, record.key_id, record.expires_at), record


def revoke_credential(store: ModelStore, site: str, *, now: float | None = None) -> Credential:
    """Revoke ``site``'s credential (its token is refused from now on). ValueError if it has none."""
    record = load_credential(store, site)
    if record is None:
        raise ValueError(
            f"site {site!r} has no credential record; issue one first (its legacy token, if any, "
            "stops working as soon as it has one)"
        )
    revoked = replace(record, revoked=True, revoked_at=int(time.time() if now is None else now))
    store.put_json(credential_key(site), revoked.to_dict(), overwrite=True)
    return revoked


def authenticate(store: ModelStore, secret: str, token: str, *, now: float | None = None) -> TokenClaims:
    """The claims of ``token`` if it is valid now against the registry in ``store``.

    Raises:
        InvalidToken: malformed / HMAC mismatch, or (:class:`CredentialRefused`) expired, revoked,
            rotated, or a legacy token of a site that has a record.
    """
    claims = verify_token(secret, token)
    record = load_credential(store, claims.site)
    moment = time.time() if now is None else now
    if claims.legacy:
        if record is not None:
            raise CredentialRefused(
                "rotated_token",
                f"site {claims.site!r} has a registered credential; its legacy token is no longer accepted",
            )
        return claims
    if record is None or record.key_id != claims.key_id:
        raise CredentialRefused(
            "rotated_token",
            f"the token of site {claims.site!r} was replaced by a newer one or never registered",
        )
    if record.revoked:
        raise CredentialRefused("revoked_token", f"the credential of site {claims.site!r} was revoked")
    if moment >= min(record.expires_at, int(claims.expires_at or 0)):
        raise CredentialRefused(
            "expired_token",
            f"the token of site {claims.site!r} expired at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(record.expires_at))}",
        )
    return claims
