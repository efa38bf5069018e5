"""Per-site bearer tokens, HMAC'd with the central's secret.

Current tokens (format 2) name the site, a key id and an expiry inside the HMAC'd part::

    jipfed2.<site>.<key id: 16 hex>.<expiry: unix seconds>.<HMAC-SHA256(secret, "jipfed-site-token:v2:" + site.kid.expiry)>

They are issued together with a record in the credential registry
(:mod:`jipfed.central.credentials`), which decides whether a key id is still valid (rotation,
revocation). Legacy tokens (format 1, ``jipfed.<site>.<HMAC(secret, "jipfed-site-token:" + site)>``)
never expire; the endpoint accepts them only for a site that has no registry record yet.
The site id a request acts as comes from the token only; the HMAC is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from jipfed.storage.layout import validate_slug

TOKEN_PREFIX = "jipfed"
TOKEN_PREFIX_V2 = "jipfed2"
MIN_SECRET_CHARS = 32
_CONTEXT = b"jipfed-site-token:"
_CONTEXT_V2 = b"jipfed-site-token:v2:"
_HEX_CHARS = 64
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")


class InvalidToken(ValueError):
    """A token is malformed or was not issued with this central's secret (never echoes the secret)."""


def check_secret(secret: str) -> str:
    """Return ``secret`` if it is a string of at least :data:`MIN_SECRET_CHARS` characters."""
    if not isinstance(secret, str) or len(secret) < MIN_SECRET_CHARS:
        length = len(secret) if isinstance(secret, str) else type(secret).__name__
        raise ValueError(
            f"the site token secret must be a string of at least {MIN_SECRET_CHARS} characters "
            f"(got {length}); generate one with: python -c 'import secrets; print(secrets.token_hex(32))'"
        )
    return secret


def _mac(secret: str, site: str, context: bytes = _CONTEXT) -> str:
    return hmac.new(
        check_secret(secret).encode("utf-8"), context + site.encode("utf-8"), hashlib.sha256
    ).hexdigest()


def _check_mac(secret: str, signed: str, mac: str, site: str, context: bytes) -> None:
    if len(mac) != _HEX_CHARS:
        raise InvalidToken(
            f"malformed site token for site {site!r}: the HMAC must be {_HEX_CHARS} hex digits"
        )
    if not hmac.compare_digest(mac.encode("ascii", "replace"), _mac(secret, signed, context).encode("ascii")):
        raise InvalidToken(f"site token for site {site!r} was not issued by this central (HMAC mismatch)")


@dataclass(frozen=True)
class TokenClaims:
    """What a verified token says: the site, and (format 2) its key id and expiry (unix seconds)."""

    site: str
    key_id: str | None = None
    expires_at: int | None = None

    @property
    def legacy(self) -> bool:
        return self.key_id is None


def issue_token(secret: str, site: str, key_id: str, expires_at: int) -> str:
    """A format-2 token of ``site`` for key ``key_id`` (16 hex digits), valid until ``expires_at``."""
    validate_slug(site, "site id")
    if not _KEY_ID.match(key_id) or isinstance(expires_at, bool) or not isinstance(expires_at, int):
        raise ValueError(f"key id must be 16 hex digits and expiry an int, got {key_id!r}, {expires_at!r}")
    signed = f"{site}.{key_id}.{expires_at}"
    return f"{TOKEN_PREFIX_V2}.{signed}.{_mac(secret, signed, _CONTEXT_V2)}"


def verify_token(secret: str, token: str) -> TokenClaims:
    """The claims of a format-2 or legacy token whose HMAC matches (expiry and registry not checked).

    Raises:
        InvalidToken: malformed, an invalid site id, or an HMAC mismatch.
    """
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) == 5 and parts[0] == TOKEN_PREFIX_V2:
        check_secret(secret)
        _, site, key_id, expiry, mac = parts
        try:
            validate_slug(site, "site id")
        except ValueError as exc:
            raise InvalidToken(f"malformed site token: {exc}") from None
        if not _KEY_ID.match(key_id) or not expiry.isdigit() or len(expiry) > 12:
            raise InvalidToken(f"malformed site token for site {site!r}: bad key id or expiry")
        _check_mac(secret, f"{site}.{key_id}.{expiry}", mac, site, _CONTEXT_V2)
        return TokenClaims(site, key_id, int(expiry))
    return TokenClaims(verify_site_token(secret, token))


def site_token(secret: str, site: str) -> str:
    """The legacy (format 1, never expiring) token of ``site`` under ``secret``.

    Accepted only while ``site`` has no credential record; use
    :func:`jipfed.central.credentials.issue_credential` for an expiring, revocable one.
    """
    validate_slug(site, "site id")
    return f"{TOKEN_PREFIX}.{site}.{_mac(secret, site)}"


def verify_site_token(secret: str, token: str) -> str:
    """The site id ``token`` was issued for.

    Raises:
        InvalidToken: the token is malformed, names an invalid site id, or its HMAC does not match.
        ValueError: ``secret`` is too short (a central misconfiguration, not the caller's fault).
    """
    check_secret(secret)
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise InvalidToken(
            f"malformed site token: expected '{TOKEN_PREFIX_V2}.<site>.<key id>.<expiry>.<hmac>'"
        )
    _, site, mac = parts
    try:
        validate_slug(site, "site id")
    except ValueError as exc:
        raise InvalidToken(f"malformed site token: {exc}") from None
    _check_mac(secret, site, mac, site, _CONTEXT)
    return site
