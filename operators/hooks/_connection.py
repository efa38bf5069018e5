"""Reading Airflow Connection fields the same way in every hook (Airflow 2 and 3 Connections)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit


class ConnectionLike(Protocol):
    """The Connection attributes the hooks read (``airflow.sdk.Connection`` on 3, model on 2)."""

    conn_id: str
    conn_type: str
    host: str | None
    schema: str | None
    login: str | None
    password: str | None
    port: int | None

    @property
    def extra_dejson(self) -> dict[str, Any]: ...


def base_url(conn: ConnectionLike, *, default_scheme: str = "http") -> str:
    """Base URL of an HTTP service from a Connection, without a trailing slash.

    ``host`` is either a full URL (``https://pacs.example:8443/prefix``: kept as is, ``port``
    added when the URL has none) or a host name, then ``schema`` (``http``/``https``, as in
    Airflow's HTTP connections) gives the scheme and ``port`` the port.
    """
    host = (conn.host or "").strip().rstrip("/")
    if not host:
        raise ValueError(f"connection {conn.conn_id!r}: host is empty")
    if "://" in host:
        parts = urlsplit(host)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"connection {conn.conn_id!r}: host {host!r} is not an http(s) URL")
        if conn.port and parts.port is None:
            netloc = f"{parts.netloc}:{conn.port}"
            return f"{parts.scheme}://{netloc}{parts.path}".rstrip("/")
        return host
    scheme = (conn.schema or "").strip().lower() or default_scheme
    if scheme not in ("http", "https"):
        raise ValueError(
            f"connection {conn.conn_id!r}: schema {conn.schema!r} is not http or https; "
            "put the full URL (with any path) into host instead"
        )
    return f"{scheme}://{host}:{conn.port}" if conn.port else f"{scheme}://{host}"


def checked_extras(conn: ConnectionLike, allowed: Collection[str]) -> Mapping[str, Any]:
    """The Connection's extras; unknown keys (typos) raise ValueError instead of being ignored."""
    extras = conn.extra_dejson or {}
    unknown = sorted(set(extras) - set(allowed))
    if unknown:
        raise ValueError(
            f"connection {conn.conn_id!r}: unknown extra field(s) {unknown}; allowed: {sorted(allowed)}"
        )
    return extras


def optional_str(value: str | None) -> str | None:
    """None for a missing or empty Connection field (the UI stores empty strings)."""
    return value if value else None
