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

from jipfed.operators.compat import BaseHook

from jipfed.tasks.connections import PACS_EXTRA_FIELDS, pacs_config, pacs_config_kwargs

# the connection parsing lives in the core (shared with ``jipfed task`` in a pod); re-exported here
__all__ = ["PacsHook", "PACS_EXTRA_FIELDS", "pacs_config", "pacs_config_kwargs"]

if TYPE_CHECKING:
    from jipfed.imaging.pacs import PacsConfig


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
        return pacs_config(self.get_connection(self.pacs_conn_id))
