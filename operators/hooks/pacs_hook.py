"""PacsHook: an Airflow Connection -> :class:`jipfed.imaging.pacs.PacsConfig`.

Connection (conn_type ``jipfed_pacs``; any type with these fields works)::

    host      DICOMweb server: host name, or full URL (``http://orthanc:8042``)
    schema    http / https when host is a bare name (default http)
    port      HTTP port when host is a bare name
    login     DICOMweb user (empty: no auth)
    password  its password
    extra     {"dicomweb_path": "/dicom-web",   # appended to the base URL ("" for none)
               "dimse_host": "...",             # default: the DICOMweb host name
               "dimse_port": 4242,              # default: none (no DIMSE)
               "called_aet": "ORTHANC", "calling_aet": "JIPFED", "timeout_s": 60}

e.g. ``AIRFLOW_CONN_JIPFED_PACS_DEFAULT='{"conn_type": "jipfed_pacs", "host":
"http://127.0.0.1:8042", "login": "u", "password": "p", "extra": {"dimse_port": 4242}}'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from jipfed.operators.compat import BaseHook
from jipfed.operators.hooks._connection import ConnectionLike, base_url, checked_extras, optional_str

if TYPE_CHECKING:
    from jipfed.imaging.pacs import PacsConfig

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


class PacsHook(BaseHook):
    """Reads the PACS Connection; ``get_conn()`` returns the ``PacsConfig`` the imaging code takes.

    Args:
        pacs_conn_id: The Connection id.
    """

    conn_name_attr = "pacs_conn_id"
    default_conn_name = "jipfed_pacs_default"
    conn_type = "jipfed_pacs"
    hook_name = "JIP Federated PACS (DICOMweb + DIMSE)"

    def __init__(self, pacs_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pacs_conn_id = pacs_conn_id

    def get_conn(self) -> PacsConfig:
        """The PACS configuration from the Connection."""
        kwargs = pacs_config_kwargs(self.get_connection(self.pacs_conn_id))
        from jipfed.imaging.pacs import PacsConfig

        try:
            return PacsConfig(**kwargs)
        except ValueError as exc:
            raise ValueError(f"connection {self.pacs_conn_id!r}: {exc}") from exc
