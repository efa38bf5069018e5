"""A small client for a remote Airflow's REST API (``/api/v2``, Airflow 3) with JWT auth.

Plain Python over ``requests`` (no Airflow import): the Airflow hook
``jipfed.operators.hooks.AirflowApiHook`` wraps it, and the test harness
``jipfed.testing.airflow`` uses it directly. A token is fetched from ``POST /auth/token`` with the
username and password, cached, and fetched again once when the server answers 401 (expired) or
403 "Invalid JWT token" (e.g. the server's JWT secret changed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

import requests

log = logging.getLogger(__name__)

#: DAG run states after which a run does not change any more without a clear.
TERMINAL_DAG_RUN_STATES = frozenset({"success", "failed"})
#: Requests that may be sent again: a busy metadata database (SQLite's lock in ``airflow
#: standalone``) answers 500, and these then try again after 1 s, then 2 s.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "PATCH", "DELETE"})
SERVER_ERROR_TRIES = 3


class AirflowRestError(RuntimeError):
    """A request to a remote Airflow failed; the message names the Airflow, the URL and the reason."""

    def __init__(self, message: str, *, status_code: int | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail


def _quote(segment: str) -> str:
    return quote(segment, safe="")


class AirflowRestClient:
    """Client for one Airflow instance's public REST API.

    Args:
        base_url: The Airflow's base URL (``[api] base_url``), e.g. ``http://127.0.0.1:8080`` or
            ``https://site-a.example/flow``; ``/api/v2`` and ``/auth/token`` are appended.
        username: User for ``POST /auth/token``; None sends requests without a token.
        password: That user's password.
        name: How error messages name this Airflow (e.g. a site id or connection id); defaults
            to ``base_url``.
        timeout_s: Timeout of each HTTP request in seconds.
        verify: TLS verification, as for ``requests`` (True, False or a CA bundle path).
    """

    def __init__(
        self,
        base_url: str,
        username: str | None = None,
        password: str | None = None,
        *,
        name: str | None = None,
        timeout_s: float = 30.0,
        verify: bool | str = True,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        self.base_url = base_url.rstrip("/")
        self.username = username
        self._password = password
        self.name = name or self.base_url
        self.timeout_s = timeout_s
        self._session = requests.Session()
        self._session.verify = verify
        self._token: str | None = None
        self._token_lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"AirflowRestClient(name={self.name!r}, base_url={self.base_url!r}, username={self.username!r})"
        )

    # -- authentication -------------------------------------------------------------------------

    def _describe(self) -> str:
        return self.name if self.name == self.base_url else f"{self.name} ({self.base_url})"

    def fetch_token(self) -> str:
        """Get a new JWT from ``POST /auth/token`` and cache it."""
        if self.username is None or self._password is None:
            raise AirflowRestError(f"Airflow {self._describe()}: no username/password to get a token")
        url = f"{self.base_url}/auth/token"
        try:
            response = self._session.post(
                url,
                json={"username": self.username, "password": self._password},
                timeout=self.timeout_s,
            )
        except requests.RequestException as exc:
            raise AirflowRestError(f"Airflow {self._describe()}: POST {url} failed: {exc}") from exc
        if response.status_code not in (200, 201):
            raise AirflowRestError(
                f"Airflow {self._describe()}: login as {self.username!r} at POST {url} answered "
                f"{response.status_code}: {_detail(response)}",
                status_code=response.status_code,
                detail=_detail(response),
            )
        token = response.json().get("access_token")
        if not isinstance(token, str) or not token:
            raise AirflowRestError(f"Airflow {self._describe()}: POST {url} returned no access_token")
        self._token = token
        log.debug("Got a JWT from %s as %s", self._describe(), self.username)
        return token

    def token(self) -> str | None:
        """The cached JWT, fetched first if needed; None when the client has no credentials."""
        if self.username is None:
            return None
        with self._token_lock:
            return self._token or self.fetch_token()

    def forget_token(self) -> None:
        """Drop the cached JWT; the next request logs in again."""
        self._token = None

    # -- requests -------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        expect: Iterable[int] = (200,),
    ) -> Any:
        """Send one API request and return its decoded JSON body (None for an empty body).

        Args:
            method: HTTP method.
            path: Path below the base URL, e.g. ``/api/v2/dags``.
            json: JSON request body.
            params: Query parameters.
            expect: Status codes that count as success.

        An idempotent request answered with a 5xx (a busy metadata database) is sent again, up to
        :data:`SERVER_ERROR_TRIES` times in all; a POST is never repeated.

        Raises:
            AirflowRestError: network error or any other status code.
        """
        url = f"{self.base_url}/{path.lstrip('/')}"
        expected = set(expect)
        tries = SERVER_ERROR_TRIES if method.upper() in IDEMPOTENT_METHODS else 1
        for attempt in range(1, tries + 1):
            response = self._send(method, url, json, params)
            if response.status_code < 500 or response.status_code in expected or attempt == tries:
                break
            log.warning(
                "Airflow %s: %s %s answered %s (%s); trying again",
                self.name, method, url, response.status_code, _detail(response),
            )  # fmt: skip
            time.sleep(attempt)
        if response.status_code not in expected:
            detail = _detail(response)
            raise AirflowRestError(
                f"Airflow {self._describe()}: {method} {url} answered {response.status_code}: {detail}",
                status_code=response.status_code,
                detail=detail,
            )
        if not response.content:
            return None
        return response.json()

    def _send(self, method: str, url: str, json: Any, params: Mapping[str, Any] | None) -> requests.Response:
        """One request, logged in again once if the cached token was rejected."""
        for attempt in (1, 2):
            headers = {"Accept": "application/json"}
            token = self.token()
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            try:
                response = self._session.request(
                    method, url, json=json, params=params, headers=headers, timeout=self.timeout_s
                )
            except requests.RequestException as exc:
                raise AirflowRestError(f"Airflow {self._describe()}: {method} {url} failed: {exc}") from exc
            if attempt == 1 and token is not None and _token_rejected(response):
                log.info(
                    "Airflow %s rejected the cached token (%s); logging in again",
                    self.name,
                    response.status_code,
                )
                with self._token_lock:
                    if self._token == token:
                        self._token = None
                continue
            break
        return response

    # -- API ------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /api/v2/monitor/health`` (no auth needed): status of each component."""
        return self.request("GET", "/api/v2/monitor/health")

    def get_dag(self, dag_id: str) -> dict[str, Any]:
        """``GET /api/v2/dags/{dag_id}``."""
        return self.request("GET", f"/api/v2/dags/{_quote(dag_id)}")

    def set_paused(self, dag_id: str, paused: bool) -> dict[str, Any]:
        """Pause or unpause a DAG (new DAGs start paused: their runs stay queued)."""
        return self.request("PATCH", f"/api/v2/dags/{_quote(dag_id)}", json={"is_paused": paused})

    def unpause(self, dag_id: str) -> dict[str, Any]:
        """Unpause a DAG so that its queued runs start."""
        return self.set_paused(dag_id, False)

    def import_errors(self) -> list[dict[str, Any]]:
        """``GET /api/v2/importErrors``: DAG files that failed to parse, with their tracebacks."""
        return self.request("GET", "/api/v2/importErrors", params={"limit": 100})["import_errors"]

    def trigger_dag_run(
        self,
        dag_id: str,
        conf: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        *,
        note: str | None = None,
        exist_ok: bool = False,
    ) -> dict[str, Any]:
        """Trigger a DAG run (``logical_date`` null: no data interval, runs can be concurrent).

        Args:
            dag_id: The DAG.
            conf: Run configuration; validated by the server against the DAG's Params.
            run_id: Run id; None lets Airflow generate one.
            note: Note shown on the run.
            exist_ok: With a run_id, return the existing run instead of failing when a run with
                that id already exists (makes a retried trigger idempotent).

        Returns:
            The DAG run as the API returns it (``dag_run_id``, ``state``, ``conf``…).
        """
        body: dict[str, Any] = {"logical_date": None, "conf": dict(conf or {})}
        if run_id is not None:
            body["dag_run_id"] = run_id
        if note is not None:
            body["note"] = note
        try:
            return self.request("POST", f"/api/v2/dags/{_quote(dag_id)}/dagRuns", json=body)
        except AirflowRestError as exc:
            if exist_ok and run_id is not None and exc.status_code == 409:
                log.info("Run %s of %s already exists on %s", run_id, dag_id, self.name)
                return self.get_dag_run(dag_id, run_id)
            raise

    def get_dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        """``GET /api/v2/dags/{dag_id}/dagRuns/{run_id}``."""
        return self.request("GET", f"/api/v2/dags/{_quote(dag_id)}/dagRuns/{_quote(run_id)}")

    def get_dag_run_state(self, dag_id: str, run_id: str) -> str:
        """State of a DAG run: ``queued``, ``running``, ``success`` or ``failed``."""
        return str(self.get_dag_run(dag_id, run_id)["state"])

    def list_task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Task instances of a DAG run (``task_id``, ``map_index``, ``state``, ``try_number``…)."""
        answer = self.request(
            "GET",
            f"/api/v2/dags/{_quote(dag_id)}/dagRuns/{_quote(run_id)}/taskInstances",
            params={"limit": 1000},
        )
        return list(answer["task_instances"])

    def get_task_log(
        self, dag_id: str, run_id: str, task_id: str, try_number: int = 1, *, map_index: int = -1
    ) -> str:
        """The text of one task try's log (for error messages)."""
        answer = self.request(
            "GET",
            f"/api/v2/dags/{_quote(dag_id)}/dagRuns/{_quote(run_id)}/taskInstances/"
            f"{_quote(task_id)}/logs/{try_number}",
            params={"full_content": "true", "map_index": map_index},
        )
        lines: list[str] = []
        for entry in answer.get("content", []):
            if not isinstance(entry, Mapping):
                lines.append(str(entry))
                continue
            lines.append(" ".join(str(entry[k]) for k in ("timestamp", "level", "event") if entry.get(k)))
            for error in entry.get("error_detail") or []:  # a structured traceback
                for frame in error.get("frames", []):
                    lines.append(
                        f'  File "{frame.get("filename")}", line {frame.get("lineno")}, in {frame.get("name")}'
                    )
                lines.append(f"{error.get('exc_type')}: {error.get('exc_value')}")
        return "\n".join(lines)

    def wait_for_dag_run(
        self, dag_id: str, run_id: str, *, timeout_s: float = 300.0, poll_s: float = 1.0
    ) -> dict[str, Any]:
        """Poll a DAG run until it is ``success`` or ``failed``; return the run.

        For scripts, tests and the CLI. Inside Airflow, wait with a deferrable sensor instead of
        holding a worker slot.

        Raises:
            TimeoutError: the run is not finished after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            run = self.get_dag_run(dag_id, run_id)
            if run["state"] in TERMINAL_DAG_RUN_STATES:
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Airflow {self._describe()}: run {run_id} of {dag_id} still {run['state']} "
                    f"after {timeout_s:.0f} s"
                )
            time.sleep(poll_s)


def _token_rejected(response: requests.Response) -> bool:
    """True for the answers that a fresh token can fix: expired (401) or unknown signature (403)."""
    if response.status_code == 401:
        return True
    return response.status_code == 403 and "Invalid JWT" in str(_detail(response))


def _detail(response: requests.Response) -> Any:
    """The ``detail`` of an error answer, or its text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, Mapping) and "detail" in body:
        return body["detail"]
    return body
