"""AirflowApiHook: a remote Airflow's REST API (``/api/v2``, Airflow 3) from a Connection.

Connection (conn_type ``http``)::

    host      base URL (``https://site-a.example/flow``) or host name
    schema    http / https when host is a bare name      port  port when host is a bare name
    login     API user                                    password  its password
    extra     {"timeout_s": 30, "verify": true,           # verify: bool or CA bundle path
               "dag_id": "jipfed_site"}                   # the DAG to trigger there (optional)

The client (:class:`jipfed.airflow_rest.AirflowRestClient`) logs in with ``POST /auth/token``,
caches the JWT and logs in again when it is rejected; errors name the connection and URL.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

from jipfed.operators.compat import BaseHook
from jipfed.operators.hooks._connection import ConnectionLike, base_url, checked_extras, optional_str

from jipfed.airflow_rest import AirflowRestClient

API_EXTRA_FIELDS = ("timeout_s", "verify", "dag_id")


def rest_client(conn: ConnectionLike) -> AirflowRestClient:
    """A REST client for the Airflow a Connection describes, named after the connection."""
    extras = checked_extras(conn, API_EXTRA_FIELDS)
    verify = extras.get("verify", True)
    if not isinstance(verify, (bool, str)):
        raise ValueError(f"connection {conn.conn_id!r}: verify must be true, false or a CA bundle path")
    try:
        timeout_s = float(extras.get("timeout_s", 30.0))
    except (TypeError, ValueError):
        raise ValueError(
            f"connection {conn.conn_id!r}: timeout_s {extras['timeout_s']!r} is not a number"
        ) from None
    username = optional_str(conn.login)
    password = optional_str(conn.password)
    if (username is None) != (password is None):
        raise ValueError(f"connection {conn.conn_id!r}: give both login and password, or neither")
    return AirflowRestClient(
        base_url(conn),
        username,
        password,
        name=f"connection {conn.conn_id!r}",
        timeout_s=timeout_s,
        verify=verify,
    )


class AirflowApiHook(BaseHook):
    """Triggers and watches DAG runs on another Airflow (e.g. a site's) over its REST API.

    Args:
        airflow_api_conn_id: The Connection id.
    """

    conn_name_attr = "airflow_api_conn_id"
    default_conn_name = "jipfed_airflow_api_default"
    conn_type = "http"
    hook_name = "JIP Federated remote Airflow REST API"

    def __init__(self, airflow_api_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.airflow_api_conn_id = airflow_api_conn_id

    @cached_property
    def client(self) -> AirflowRestClient:
        """The REST client (built once per hook, so its token is reused)."""
        return rest_client(self.get_connection(self.airflow_api_conn_id))

    def get_conn(self) -> AirflowRestClient:
        """The REST client."""
        return self.client

    def trigger_dag_run(
        self,
        dag_id: str,
        conf: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        *,
        note: str | None = None,
        exist_ok: bool = False,
    ) -> dict[str, Any]:
        """Trigger a run (``logical_date`` null); see :meth:`AirflowRestClient.trigger_dag_run`."""
        return self.client.trigger_dag_run(dag_id, conf, run_id, note=note, exist_ok=exist_ok)

    def get_dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        """The DAG run as the API returns it."""
        return self.client.get_dag_run(dag_id, run_id)

    def get_dag_run_state(self, dag_id: str, run_id: str) -> str:
        """``queued``, ``running``, ``success`` or ``failed``."""
        return self.client.get_dag_run_state(dag_id, run_id)

    def unpause(self, dag_id: str) -> dict[str, Any]:
        """Unpause a DAG (new DAGs start paused; their runs stay queued)."""
        return self.client.unpause(dag_id)

    def list_task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Task instances of a run (``task_id``, ``map_index``, ``state``…)."""
        return self.client.list_task_instances(dag_id, run_id)

    def dag_id(self, default: str) -> str:
        """The Connection's ``dag_id`` extra (the DAG to trigger on that Airflow), else ``default``."""
        extras = checked_extras(self.get_connection(self.airflow_api_conn_id), API_EXTRA_FIELDS)
        dag_id = extras.get("dag_id")
        if dag_id in (None, ""):
            return default
        if not isinstance(dag_id, str):
            raise ValueError(
                f"connection {self.airflow_api_conn_id!r}: dag_id must be a string, got {dag_id!r}"
            )
        return dag_id

    def test_connection(self) -> tuple[bool, str]:
        """Log in and read the health endpoint (the UI's "Test" button)."""
        try:
            self.client.fetch_token()
            health = self.client.health()
        except Exception as exc:  # the UI shows the message; any failure means "not working"
            return False, str(exc)
        return True, f"logged in; health: {health}"
