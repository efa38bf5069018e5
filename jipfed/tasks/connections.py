"""Reading connection fields the same way everywhere: Airflow Connections (the hooks) and pods.

The hooks (``jipfed.operators.hooks``) pass an Airflow Connection; ``jipfed task`` in a pod passes
an :class:`EnvConnection` rebuilt from ``JIPFED_<NAME>_CONN`` (the Connection's fields as JSON,
without the password) and the secret variable holding the password (``jipfed.tasks.env``).
No Airflow import here.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:  # imaging imports the DICOM stack: only when a step runs
    from jipfed.central.client import CentralClient
    from jipfed.imaging.pacs import PacsConfig
    from jipfed.storage.base import ModelStore


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


@dataclass(frozen=True)
class EnvConnection:
    """A Connection's fields outside Airflow (a pod): what :class:`ConnectionLike` promises."""

    conn_id: str
    conn_type: str = "http"
    host: str | None = None
    schema: str | None = None
    login: str | None = None
    password: str | None = None
    port: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def extra_dejson(self) -> dict[str, Any]:
        return dict(self.extra)

    def public_json(self) -> str:
        """The fields as JSON, without the password (it travels as a secret reference)."""
        data = {k: getattr(self, k) for k in ("conn_id", "conn_type", "host", "schema", "login", "port")}
        return json.dumps({**data, "extra": dict(self.extra)}, sort_keys=True)

    @classmethod
    def from_connection(cls, conn: ConnectionLike) -> EnvConnection:
        """A copy of an Airflow Connection's fields."""
        return cls(
            conn_id=conn.conn_id,
            conn_type=conn.conn_type,
            host=conn.host,
            schema=conn.schema,
            login=conn.login,
            password=conn.password,
            port=conn.port,
            extra=conn.extra_dejson or {},
        )

    @classmethod
    def from_json(cls, text: str, password: str | None, where: str) -> EnvConnection:
        """Rebuild from :meth:`public_json`'s text and the password; ValueError naming ``where``."""
        try:
            data = json.loads(text)
            if not isinstance(data, Mapping):
                raise ValueError("not a JSON object")
            port = data.get("port")
            return cls(
                conn_id=str(data["conn_id"]),
                conn_type=str(data.get("conn_type") or "http"),
                host=data.get("host"),
                schema=data.get("schema"),
                login=data.get("login"),
                password=password,
                port=None if port in (None, "") else int(port),
                extra=dict(data.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where} does not hold a connection as JSON: {exc}") from exc


# -- the PACS (DICOMweb + DIMSE) ----------------------------------------------------------------------

PACS_EXTRA_FIELDS = ("dicomweb_path", "dimse_host", "dimse_port", "called_aet", "calling_aet", "timeout_s")
DEFAULT_DICOMWEB_PATH = "/dicom-web"


def _aet(conn_id: str, key: str, value: Any) -> str:
    """A DICOM AE title: 1-16 printable ASCII characters, no backslash."""
    text = str(value).strip()
    if not 1 <= len(text) <= 16 or not text.isascii() or not text.isprintable() or "\\" in text:
        raise ValueError(
            f"connection {conn_id!r}: {key} {value!r} is not a valid AE title (1-16 ASCII chars)"
        )
    return text


def _port(conn_id: str, value: Any) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"connection {conn_id!r}: dimse_port {value!r} is not an integer") from None
    if not 1 <= port <= 65535 or isinstance(value, (bool, float)):
        raise ValueError(f"connection {conn_id!r}: dimse_port {value!r} is not a port number")
    return port


def pacs_config_kwargs(conn: ConnectionLike) -> dict[str, Any]:
    """Keyword arguments of ``PacsConfig`` read from a Connection (unset fields keep its defaults)."""
    extras = checked_extras(conn, PACS_EXTRA_FIELDS)
    base = base_url(conn)
    path = str(extras.get("dicomweb_path", DEFAULT_DICOMWEB_PATH)).strip()
    if path and not path.startswith("/"):
        path = "/" + path
    kwargs: dict[str, Any] = {
        "dicomweb_url": base + path.rstrip("/"),
        "username": optional_str(conn.login),
        "password": optional_str(conn.password),
        "dimse_host": str(extras.get("dimse_host") or urlsplit(base).hostname),
        "dimse_port": None
        if extras.get("dimse_port") in (None, "")
        else _port(conn.conn_id, extras["dimse_port"]),
    }
    for key in ("called_aet", "calling_aet"):
        if extras.get(key) not in (None, ""):
            kwargs[key] = _aet(conn.conn_id, key, extras[key])
    if extras.get("timeout_s") not in (None, ""):
        try:
            timeout_s = float(extras["timeout_s"])
        except (TypeError, ValueError):
            timeout_s = -1.0
        if not timeout_s > 0:
            raise ValueError(f"connection {conn.conn_id!r}: timeout_s {extras['timeout_s']!r} must be > 0")
        kwargs["timeout_s"] = timeout_s
    return kwargs


# -- the central endpoint -----------------------------------------------------------------------------

CENTRAL_EXTRA_FIELDS = ("timeout_s", "verify", "central_public_key", "signing_key_file")
DEFAULT_TIMEOUT_S = 60.0


def central_client_kwargs(conn: ConnectionLike) -> dict[str, Any]:
    """Keyword arguments of ``CentralClient`` read from a Connection (``base_url``, ``token``, ...)."""
    extras = checked_extras(conn, CENTRAL_EXTRA_FIELDS)
    token = optional_str(conn.password)
    if token is None:
        raise ValueError(f"connection {conn.conn_id!r}: password must hold the site's token for the central")
    verify = extras.get("verify", True)
    if not isinstance(verify, (bool, str)):
        raise ValueError(f"connection {conn.conn_id!r}: verify must be true, false or a CA bundle path")
    raw_timeout = extras.get("timeout_s", DEFAULT_TIMEOUT_S)
    try:
        timeout_s = float(raw_timeout)
    except (TypeError, ValueError):
        timeout_s = -1.0
    if isinstance(raw_timeout, bool) or not timeout_s > 0:
        raise ValueError(f"connection {conn.conn_id!r}: timeout_s {raw_timeout!r} must be a number > 0")
    return {
        "base_url": base_url(conn),
        "token": token,
        "timeout_s": timeout_s,
        "verify": verify,
        **signing_kwargs(conn, extras),
    }


def signing_kwargs(conn: ConnectionLike, extras: dict[str, Any]) -> dict[str, Any]:
    """``central_public_key`` (the central's Ed25519 key, base64: models are verified with it) and
    ``signing_key`` (loaded from ``signing_key_file``, the site's Ed25519 private key in PEM: updates
    are signed with it) from the Connection's extras; absent extras mean no signing / no check."""
    kwargs: dict[str, Any] = {}
    public = extras.get("central_public_key")
    if public is not None:
        from jipfed.federation.signing import load_public_key

        try:
            load_public_key(str(public).encode("ascii"))
        except (ValueError, UnicodeError) as exc:
            raise ValueError(f"connection {conn.conn_id!r}: central_public_key: {exc}") from None
        kwargs["central_public_key"] = str(public)
    key_file = extras.get("signing_key_file")
    if key_file is not None:
        from jipfed.federation.signing import load_private_key

        try:
            kwargs["signing_key"] = load_private_key(Path(str(key_file)).read_bytes())
        except (OSError, ValueError, TypeError) as exc:  # never echo the key's contents
            raise ValueError(
                f"connection {conn.conn_id!r}: signing_key_file {key_file!r} is not a readable Ed25519 "
                f"private key in PEM ({type(exc).__name__})"
            ) from None
    return kwargs


# -- the model store ----------------------------------------------------------------------------------

S3_CONN_TYPES = ("aws", "s3")
LOCAL_CONN_TYPES = ("fs",)
S3_EXTRA_FIELDS = (
    "endpoint_url",
    "region_name",
    "bucket",
    "prefix",
    "verify",
    "aws_access_key_id",
    "aws_secret_access_key",
)
DEFAULT_BUCKET = "jipfed"


def store_config(conn: ConnectionLike) -> dict[str, Any]:
    """The object store's location and credentials from a Connection.

    Returns:
        ``{"kind": "s3", "endpoint_url", "region", "bucket", "prefix", "access_key", "secret_key",
        "verify"}``
        (``endpoint_url`` None = AWS) or ``{"kind": "local", "root"}``.
    """
    if conn.conn_type in LOCAL_CONN_TYPES:
        extras = checked_extras(conn, ("path",))
        root = str(extras.get("path") or "").strip()
        if not root:
            raise ValueError(f"connection {conn.conn_id!r}: an fs connection needs extra 'path'")
        return {"kind": "local", "root": root}
    if conn.conn_type not in S3_CONN_TYPES:
        raise ValueError(
            f"connection {conn.conn_id!r}: conn_type {conn.conn_type!r} is not a model store; "
            f"use one of {sorted(S3_CONN_TYPES + LOCAL_CONN_TYPES)}"
        )
    extras = checked_extras(conn, S3_EXTRA_FIELDS)
    access_key = optional_str(conn.login) or extras.get("aws_access_key_id") or None
    secret_key = optional_str(conn.password) or extras.get("aws_secret_access_key") or None
    if (access_key is None) != (secret_key is None):
        raise ValueError(f"connection {conn.conn_id!r}: give both access key and secret key, or neither")
    endpoint_url = extras.get("endpoint_url") or None
    if endpoint_url is not None and not str(endpoint_url).startswith(("http://", "https://")):
        raise ValueError(f"connection {conn.conn_id!r}: endpoint_url {endpoint_url!r} is not an http(s) URL")
    verify = extras.get("verify", True)
    if not isinstance(verify, (bool, str)):
        raise ValueError(f"connection {conn.conn_id!r}: verify must be true, false or a CA bundle path")
    return {
        "kind": "s3",
        "endpoint_url": str(endpoint_url).rstrip("/") if endpoint_url else None,
        "region": extras.get("region_name") or None,
        "bucket": str(extras.get("bucket") or DEFAULT_BUCKET),
        "prefix": str(extras.get("prefix") or "").strip("/"),
        "access_key": access_key,
        "secret_key": secret_key,
        "verify": verify,
    }


# -- the handles the steps take --------------------------------------------------------------------


def pacs_config(conn: ConnectionLike) -> PacsConfig:
    """The ``PacsConfig`` a PACS connection describes; ValueError naming the connection."""
    from jipfed.imaging.pacs import PacsConfig

    kwargs = pacs_config_kwargs(conn)
    try:
        return PacsConfig(**kwargs)
    except ValueError as exc:
        raise ValueError(f"connection {conn.conn_id!r}: {exc}") from exc


def central_client(conn: ConnectionLike) -> CentralClient:
    """A client of the central endpoint a connection describes (it holds no open connection)."""
    from jipfed.central.client import CentralClient

    kwargs = central_client_kwargs(conn)
    return CentralClient(kwargs.pop("base_url"), kwargs.pop("token"), **kwargs)


def open_model_store(conn: ConnectionLike) -> ModelStore:
    """The object store a model-store connection describes, opened."""
    from jipfed.storage.factory import open_store

    return open_store(**store_config(conn))
