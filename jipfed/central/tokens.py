"""Per-site bearer tokens derived from one central secret: nothing is stored per site.

A site's token is ``jipfed.<site>.<hex>`` with ``hex = HMAC-SHA256(secret, b"jipfed-site-token:" + site)``.
The central admin issues it once (``jipfed site-token --site site-a``) and hands it to the site;
the endpoint recomputes the HMAC of the site named in the token and compares in constant time, so
the site id a request acts as comes from the token only. Revoking one site means rotating the
secret (every site gets a new token).
"""

from __future__ import annotations

import hashlib
import hmac

from jipfed.storage.layout import validate_slug

TOKEN_PREFIX = "jipfed"
MIN_SECRET_CHARS = 32
_CONTEXT = b"jipfed-site-token:"
_HEX_CHARS = 64


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


def _mac(secret: str, site: str) -> str:
    return hmac.new(
        check_secret(secret).encode("utf-8"), _CONTEXT + site.encode("utf-8"), hashlib.sha256
    ).hexdigest()


def site_token(secret: str, site: str) -> str:
    """The bearer token of ``site`` (a slug) under ``secret``."""
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
        raise InvalidToken(f"malformed site token: expected '{TOKEN_PREFIX}.<site>.<hmac>'")
    _, site, mac = parts
    try:
        validate_slug(site, "site id")
    except ValueError as exc:
        raise InvalidToken(f"malformed site token: {exc}") from None
    if len(mac) != _HEX_CHARS:
        raise InvalidToken(
            f"malformed site token for site {site!r}: the HMAC must be {_HEX_CHARS} hex digits"
        )
    if not hmac.compare_digest(mac.encode("ascii", "replace"), _mac(secret, site).encode("ascii")):
        raise InvalidToken(f"site token for site {site!r} was not issued by this central (HMAC mismatch)")
    return site
