"""Start a real ``airflow standalone`` (Airflow 3) for the demo, benchmarks and tests.

``AirflowStandalone`` runs scheduler, DAG processor, triggerer and API server with a SQLite DB in
its own ``AIRFLOW_HOME``, bound to 127.0.0.1 on free ports (picked again when another process
took one before Airflow bound it), with a SimpleAuthManager admin whose password the caller
chooses or gets generated (written to the passwords file before start). Usage::

    with AirflowStandalone(home=tmp_path / "af", dags_folder=dags) as af:
        af.wait_for_dag("my_dag")
        run = af.run_dag("my_dag", conf={"x": 1})
        assert run["state"] == "success"

The process starts in its own session; stopping sends SIGINT to ``airflow standalone`` (which
then stops its components), then SIGTERM and SIGKILL to whatever is left of its process group.
The combined output stays in ``<home>/standalone.log``; errors quote its tail. No Airflow import
here: the client is :class:`jipfed.airflow_rest.AirflowRestClient`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from jipfed.airflow_rest import AirflowRestClient, AirflowRestError
from jipfed.local.ports import free_port, port_taken

log = logging.getLogger(__name__)

HEALTH_COMPONENTS = ("metadatabase", "scheduler", "triggerer", "dag_processor")


#: Runs ``argv[1:]`` with SIGINT at its default disposition (then Python's KeyboardInterrupt handler).
_DEFAULT_SIGINT = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"


def with_default_sigint(argv: list[str]) -> list[str]:
    """``argv`` run through a tiny exec wrapper that resets SIGINT to its default first.

    A shell's background job (and so anything it starts) inherits SIGINT *ignored*; a Python
    process then installs no KeyboardInterrupt handler, and ``airflow standalone`` would sit out
    the SIGINT that :meth:`AirflowStandalone.stop` sends (20 s, then SIGTERM). ``exec`` keeps the
    pid, so the process group and :meth:`~AirflowStandalone.stop` are unchanged.
    """
    return [sys.executable, "-c", _DEFAULT_SIGINT, *argv]


class AirflowStandaloneError(RuntimeError):
    """``airflow standalone`` did not start, stopped early, or a DAG/run did not behave."""


#: Starts with freshly picked ports after a start lost a port to another process.
PORT_ATTEMPTS = 3


class _PortTaken(AirflowStandaloneError):
    """A component could not bind a port it was given."""


def default_airflow_bin() -> Path:
    """The ``airflow`` executable next to this interpreter (the venv's bin)."""
    return Path(sys.executable).parent / "airflow"


class AirflowStandalone:
    """A running ``airflow standalone``; use as a context manager.

    Args:
        home: AIRFLOW_HOME (created; the SQLite DB, config, logs and ``standalone.log`` go here).
        dags_folder: The DAGs folder the DAG processor parses.
        port: API server port; None picks a free one.
        username: SimpleAuthManager admin user.
        password: Its password; None generates one (see :attr:`password`).
        env: Extra environment variables, applied last (e.g. ``AIRFLOW__CORE__...`` overrides).
        airflow_bin: The ``airflow`` executable; its folder goes first on PATH because the
            components spawn ``airflow`` by name.
        parallelism: ``[core] parallelism``; the default 32 spawns ~40 processes (~5.6 GB).
        startup_timeout_s: How long :meth:`start` waits for all components to be healthy (a
            liveness limit: an exited process fails at once; a loaded 2-core machine can need minutes).
    """

    def __init__(
        self,
        home: Path | str,
        dags_folder: Path | str,
        *,
        port: int | None = None,
        username: str = "admin",
        password: str | None = None,
        env: Mapping[str, str] | None = None,
        airflow_bin: Path | str | None = None,
        parallelism: int = 4,
        startup_timeout_s: float = 600.0,
    ) -> None:
        if ":" in username or "," in username or not username:
            raise ValueError(f"username must be non-empty without ':' or ',', got {username!r}")
        if parallelism < 1:
            raise ValueError(f"parallelism must be >= 1, got {parallelism}")
        self.home = Path(home).resolve()
        self.dags_folder = Path(dags_folder).resolve()
        self._pick_ports = port is None
        self.port = port or free_port()
        self.username = username
        self.password = password or secrets.token_urlsafe(16)
        self.extra_env = dict(env or {})
        self.airflow_bin = Path(airflow_bin) if airflow_bin else default_airflow_bin()
        self.parallelism = parallelism
        self.startup_timeout_s = startup_timeout_s
        self.log_path = self.home / "standalone.log"
        self.passwords_file = self.home / "simple_auth_manager_passwords.json"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_start = 0
        self._use_port(self.port)

    def _use_port(self, port: int) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.client = AirflowRestClient(
            self.base_url, self.username, self.password, name=f"standalone:{port}"
        )

    # -- lifecycle ------------------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """The environment ``airflow standalone`` runs with."""
        env = dict(os.environ)
        for key in [k for k in env if k.startswith("AIRFLOW__") or k.startswith("AIRFLOW_CONN_")]:
            del env[key]  # a caller's Airflow settings must not leak into this instance
        bin_dir = str(self.airflow_bin.parent)
        env.update(
            {
                "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{self.username}:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.passwords_file),
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                # Without it, tasks on a port other than 8080 cannot reach the execution API.
                "AIRFLOW__API__BASE_URL": self.base_url,
                # Log servers listen on all interfaces; free ports avoid clashes between instances.
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
                # Pick up DAG files added after start within seconds (default 300 s).
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        """Start ``airflow standalone`` and wait until every component is healthy.

        When a component reports that a port it was given is taken (another process got it between
        picking and binding), Airflow is stopped and started again on fresh ports (the API port
        only if the caller did not choose it), up to :data:`PORT_ATTEMPTS` times.
        """
        if self.process is not None:
            raise AirflowStandaloneError("already started")
        if not self.airflow_bin.exists():
            raise AirflowStandaloneError(f"airflow executable not found: {self.airflow_bin}")
        if not self.dags_folder.is_dir():
            raise AirflowStandaloneError(f"dags_folder is not a folder: {self.dags_folder}")
        self.home.mkdir(parents=True, exist_ok=True)
        self.passwords_file.write_text(json.dumps({self.username: self.password}) + "\n")
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                self._start_once()
                return
            except _PortTaken as exc:
                if attempt == PORT_ATTEMPTS:
                    raise AirflowStandaloneError(f"{exc} (after {attempt} attempts)") from exc
                log.warning("%s; starting again on fresh ports", exc)
                if self._pick_ports:
                    self._use_port(free_port())

    def _start_once(self) -> None:
        self._log_file = self.log_path.open("ab")
        self._log_start = self._log_file.tell()
        log.info("Starting airflow standalone on %s (home %s)", self.base_url, self.home)
        started = time.monotonic()
        self.process = subprocess.Popen(
            with_default_sigint([str(self.airflow_bin), "standalone"]),
            cwd=self.home,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self.wait_healthy(self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info("airflow standalone healthy after %.1f s", time.monotonic() - started)

    def wait_healthy(self, timeout_s: float) -> dict[str, Any]:
        """Wait until ``/api/v2/monitor/health`` reports every component healthy."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while True:
            self._check_running()
            try:
                last = self.client.health()
                if all(last.get(c, {}).get("status") == "healthy" for c in HEALTH_COMPONENTS):
                    return last
            except AirflowRestError as exc:
                last = str(exc)
            if port_taken(self._log_since_start()):
                raise _PortTaken(f"a port of airflow standalone was taken\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AirflowStandaloneError(
                    f"airflow standalone not healthy after {timeout_s:.0f} s (last: {last})\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.5)

    def _log_since_start(self) -> str:
        """What this start wrote to ``standalone.log`` so far."""
        with self.log_path.open("rb") as handle:
            handle.seek(self._log_start)
            return handle.read().decode(errors="replace")

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop all components: SIGINT, then SIGTERM and SIGKILL to the process group.

        SIGINT goes to the ``airflow standalone`` leader only: it then terminates its components,
        which shut down cleanly. (SIGINT to the whole group at once sometimes left the scheduler
        waiting for its interrupted executor workers.) Whatever is left in the group after
        ``timeout_s`` gets SIGTERM, and SIGKILL 5 s later.
        """
        process, self.process = self.process, None
        if process is not None:
            pgid = process.pid  # start_new_session: the group id is the leader's pid
            started = time.monotonic()
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("airflow standalone still running %.0f s after SIGINT", timeout_s)
            for sig, grace_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                left = _group_members(pgid)
                if not left:
                    break
                log.warning("sending %s to what is left of airflow standalone: %s", sig.name, "; ".join(left))
                _signal_group(pgid, sig)
                deadline = time.monotonic() + grace_s
                while _group_members(pgid) and time.monotonic() < deadline:
                    time.sleep(0.2)
            if process.poll() is None:
                process.wait(timeout=5.0)
            log.info("airflow standalone stopped in %.1f s", time.monotonic() - started)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def kill(self) -> None:
        """SIGKILL every process of the instance at once, as a crash or power loss would."""
        process, self.process = self.process, None
        if process is not None:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(timeout=10.0)
            deadline = time.monotonic() + 10.0
            while _group_members(process.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            log.info("airflow standalone killed")
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> AirflowStandalone:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- helpers --------------------------------------------------------------------------------

    def log_tail(self, n_lines: int = 60) -> str:
        """The last lines of ``standalone.log``, for error messages."""
        if not self.log_path.exists():
            return "(no standalone.log)"
        lines = self.log_path.read_text(errors="replace").splitlines()[-n_lines:]
        return f"--- last {len(lines)} lines of {self.log_path} ---\n" + "\n".join(lines)

    @property
    def running(self) -> bool:
        """Whether the ``airflow standalone`` process is started and has not exited."""
        return self.process is not None and self.process.poll() is None

    def _check_running(self) -> None:
        if self.process is None:
            raise AirflowStandaloneError("airflow standalone is not running")
        code = self.process.poll()
        if code is not None:
            raise AirflowStandaloneError(f"airflow standalone exited with {code}\n{self.log_tail()}")

    def wait_for_dag(self, dag_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
        """Wait until the DAG processor has parsed ``dag_id``; fail early on an import error."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_running()
            try:
                return self.client.get_dag(dag_id)
            except AirflowRestError as exc:
                if exc.status_code != 404:
                    raise
            errors = self.client.import_errors()
            if errors:
                text = "\n".join(f"{e.get('filename')}:\n{e.get('stack_trace')}" for e in errors)
                raise AirflowStandaloneError(f"DAG {dag_id!r} not parsed; import errors:\n{text}")
            if time.monotonic() > deadline:
                raise AirflowStandaloneError(
                    f"DAG {dag_id!r} not parsed after {timeout_s:.0f} s (the DAG processor skips files "
                    f"without the words 'airflow' and 'dag': dag_discovery_safe_mode)\n{self.log_tail()}"
                )
            time.sleep(1.0)

    def run_dag(
        self,
        dag_id: str,
        conf: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        timeout_s: float = 120.0,
    ) -> dict[str, Any]:
        """Unpause ``dag_id``, trigger a run and wait until it finishes; return the run.

        Raises:
            AirflowStandaloneError: the run failed (the message holds the failed tasks' logs).
        """
        self.client.unpause(dag_id)
        run = self.client.trigger_dag_run(dag_id, conf, run_id)
        run = self.client.wait_for_dag_run(dag_id, run["dag_run_id"], timeout_s=timeout_s, poll_s=0.5)
        if run["state"] != "success":
            raise AirflowStandaloneError(
                f"run {run['dag_run_id']} of {dag_id} ended {run['state']}\n"
                + self.failed_task_logs(dag_id, run["dag_run_id"])
            )
        return run

    def failed_task_logs(self, dag_id: str, run_id: str) -> str:
        """Logs of the run's failed task instances, for error messages."""
        parts = []
        for ti in self.client.list_task_instances(dag_id, run_id):
            if ti["state"] == "failed" and ti["try_number"] >= 1:
                text = self.client.get_task_log(
                    dag_id, run_id, ti["task_id"], max(1, ti["try_number"]), map_index=ti["map_index"]
                )
                parts.append(f"--- {ti['task_id']}[{ti['map_index']}] {ti['state']} ---\n{text}")
        return "\n".join(parts) or "(no failed task instances)"


def _group_members(pgid: int) -> list[str]:
    """``pid cmdline`` of the live processes in a process group (Linux /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                members.append(f"{stat.parent.name} {cmdline.strip()}")
        except (OSError, IndexError, ValueError):
            continue
    return members


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
