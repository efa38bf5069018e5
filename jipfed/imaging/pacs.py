"""How a site reaches its PACS: one validated, frozen :class:`PacsConfig` shared by every transport.

In Airflow the config is built from a Connection by a hook; nothing else reads URLs or credentials.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

#: DICOM AE titles: 1-16 characters of the default repertoire, no backslash, not only spaces.
_AET_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


class PacsError(RuntimeError):
    """The PACS could not be reached or refused / failed a request (the message names the PACS)."""


@dataclass(frozen=True)
class PacsConfig:
    """Connection details of one PACS.

    Args:
        dicomweb_url: DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web`` (no trailing slash needed).
        username: HTTP basic-auth user; None = no authentication.
        password: HTTP basic-auth password; required when ``username`` is set, else None.
        dimse_host: Host of the DICOM (DIMSE) service.
        dimse_port: Port of the DIMSE service; None = DIMSE not available.
        called_aet: AE title of the PACS.
        calling_aet: Our AE title (the PACS must know it, see field-notes.md).
        timeout_s: Network timeout per request / association, seconds.
    """

    dicomweb_url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    dimse_host: str = "127.0.0.1"
    dimse_port: int | None = None
    called_aet: str = "ORTHANC"
    calling_aet: str = "JIPFED"
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.dicomweb_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"dicomweb_url must be an http(s) URL with a host, got {self.dicomweb_url!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"dicomweb_url must not have a query or fragment, got {self.dicomweb_url!r}")
        object.__setattr__(self, "dicomweb_url", self.dicomweb_url.rstrip("/"))
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password must be given together (or both None)")
        if self.username is not None and (not self.username or ":" in self.username):
            raise ValueError(f"username must be non-empty and contain no ':', got {self.username!r}")
        if not self.dimse_host:
            raise ValueError("dimse_host must not be empty")
        if self.dimse_port is not None and (
            isinstance(self.dimse_port, bool)
            or not isinstance(self.dimse_port, int)
            or not 0 < self.dimse_port < 65536
        ):
            raise ValueError(f"dimse_port must be None or an int in 1..65535, got {self.dimse_port!r}")
        for name in ("called_aet", "calling_aet"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _AET_RE.match(value) or not value.strip():
                raise ValueError(f"{name} must be 1-16 printable characters without '\\', got {value!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")

    @property
    def auth(self) -> tuple[str, str] | None:
        """``(username, password)`` for HTTP basic auth, or None."""
        if self.username is None or self.password is None:
            return None
        return (self.username, self.password)
