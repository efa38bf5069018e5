"""CentralHook: an Airflow Connection -> the client of the central endpoint a site talks to.

Connection (conn_type ``http``)::

    host      base URL of the central endpoint, with its prefix (``https://central.example/jipfed``),
              or a bare host name (then schema + port, as in Airflow's HTTP connections)
    schema    http / https when host is a bare name      port  port when host is a bare name
    password  this site's token (``jipfed site-token --site <id>`` at the central)
    extra     {"timeout_s": 60, "verify": true}          # verify: bool or CA bundle path

The central takes the site id from the token, so the token is all that identifies the site there.
e.g. ``AIRFLOW_CONN_JIPFED_CENTRAL_DEFAULT='{"conn_type": "http", "host":
"https://central.example/jipfed", "password": "jipfed.site-a.<hmac>"}'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jipfed.operators.compat import BaseHook

from jipfed.tasks.connections import CENTRAL_EXTRA_FIELDS, central_client, central_client_kwargs

# the connection parsing lives in the core (shared with ``jipfed task`` in a pod); re-exported here
__all__ = ["CentralHook", "CENTRAL_EXTRA_FIELDS", "central_client", "central_client_kwargs"]

if TYPE_CHECKING:
    from jipfed.central.client import CentralClient


class CentralHook(BaseHook):
    """Reads the central endpoint's Connection; ``get_conn()`` returns a ``CentralClient``.

    Args:
        central_conn_id: The Connection id.
    """

    conn_name_attr = "central_conn_id"
    default_conn_name = "jipfed_central_default"
    conn_type = "http"
    hook_name = "JIP Federated central endpoint"

    def __init__(self, central_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.central_conn_id = central_conn_id

    def get_client_kwargs(self) -> dict[str, Any]:
        """``base_url``, ``token``, ``timeout_s`` and ``verify`` from the Connection."""
        return central_client_kwargs(self.get_connection(self.central_conn_id))

    def get_conn(self) -> CentralClient:
        """A client of the central endpoint (one per call; it holds no open connection)."""
        return central_client(self.get_connection(self.central_conn_id))
