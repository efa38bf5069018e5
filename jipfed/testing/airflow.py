"""Start a real ``airflow standalone`` (Airflow 3) for tests, demos and benchmarks.

``AirflowStandalone`` runs scheduler, DAG processor, triggerer and API server with a SQLite DB in
its own ``AIRFLOW_HOME``, bound to 127.0.0.1 on free ports, with a SimpleAuthManager admin whose
password the harness chooses (written to the passwords file before start). Usage::

    with AirflowStandalone(home=tmp_path / "af", dags_folder=dags) as af:
        af.wait_for_dag("my_dag")
        run = af.run_dag("my_dag", conf={"x": 1})
        assert run["state"] == "success"

The process starts in its own session; stopping sends SIGINT to ``airflow standalone`` (which
then stops its components), then SIGTERM and SIGKILL to whatever is left of its process group.
The combined output stays in ``<home>/standalone.log``; errors quote its tail. No Airflow import here: the client is :class:`jipfed.airflow_rest.AirflowRestClient`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from jipfed.airflow_rest import AirflowRestClient, AirflowRestError

log = logging.getLogger(__name__)

HEALTH_COMPONENTS = ("metadatabase", "scheduler", "triggerer", "dag_processor")


class AirflowStandaloneError(RuntimeError):
    """``airflow standalone`` did not start, stopped early, or a DAG/run did not behave."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        startup_timeout_s: How long :meth:`start` waits for all components to be healthy.
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
        startup_timeout_s: float = 120.0,
    ) -> None:
        if ":" in username or "," in username or not username:
            raise ValueError(f"username must be non-empty without ':' or ',', got {username!r}")
        if parallelism < 1:
            raise ValueError(f"parallelism must be >= 1, got {parallelism}")
        self.home = Path(home).resolve()
        self.dags_folder = Path(dags_folder).resolve()
        self.port = port or free_port()
        self.username = username
        self.password = password or secrets.token_urlsafe(16)
        self.extra_env = dict(env or {})
        self.airflow_bin = Path(airflow_bin) if airflow_bin else default_airflow_bin()
        self.parallelism = parallelism
        self.startup_timeout_s = startup_timeout_s
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.home / "standalone.log"
        self.passwords_file = self.home / "simple_auth_manager_passwords.json"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self.client = AirflowRestClient(
            self.base_url, self.username, self.password, name=f"standalone:{self.port}"
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
        """Start ``airflow standalone`` and wait until every component is healthy."""
        if self.process is not None:
            raise AirflowStandaloneError("already started")
        if not self.airflow_bin.exists():
            raise AirflowStandaloneError(f"airflow executable not found: {self.airflow_bin}")
        if not self.dags_folder.is_dir():
            raise AirflowStandaloneError(f"dags_folder is not a folder: {self.dags_folder}")
        self.home.mkdir(parents=True, exist_ok=True)
        self.passwords_file.write_text(json.dumps({self.username: self.password}) + "\n")
        self._log_file = self.log_path.open("ab")
        log.info("Starting airflow standalone on %s (home %s)", self.base_url, self.home)
        started = time.monotonic()
        self.process = subprocess.Popen(
            [str(self.airflow_bin), "standalone"],
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
            if time.monotonic() > deadline:
                raise AirflowStandaloneError(
                    f"airflow standalone not healthy after {timeout_s:.0f} s (last: {last})\n"
                    f"{self.log_tail()}"
                )
            time.sleep(1.0)

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


# -- one-off scripts in a given Airflow installation (Airflow 2 and 3) ----------------------------

RESULT_MARKER = "JIPFED_RESULT "


class AirflowScriptError(RuntimeError):
    """A script run by :func:`run_airflow_script` failed; the message holds its output."""


def _tail(text: str, n_lines: int = 80) -> str:
    return "\n".join(text.splitlines()[-n_lines:])


def run_airflow_script(
    python: Path | str,
    script: str,
    *,
    home: Path | str,
    dags_folder: Path | str,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 600.0,
) -> Any:
    """Run ``script`` with the interpreter ``python`` against a fresh Airflow home; return its result.

    The interpreter's Airflow (2 or 3) gets ``AIRFLOW_HOME=home`` with a migrated SQLite DB
    (``airflow db migrate``, once per home), ``dags_folder`` as DAGs folder and no examples. The
    script reports its result by printing ``RESULT_MARKER + json.dumps(value)``; the last such
    line is decoded and returned (None if there is none).

    Raises:
        AirflowScriptError: the migration or the script exited non-zero or timed out.
    """
    python = Path(python)
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_"))}
    run_env.update(
        {
            "PATH": str(python.parent) + os.pathsep + run_env.get("PATH", ""),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(Path(dags_folder).resolve()),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "PYTHONUNBUFFERED": "1",
        }
    )
    run_env.update(env or {})
    stamp = home / ".jipfed-db-migrated"
    if not stamp.exists():
        _run_checked(
            [str(python.parent / "airflow"), "db", "migrate"], run_env, home, timeout_s, "airflow db migrate"
        )
        stamp.touch()
    script_path = home / "jipfed_script.py"
    script_path.write_text(script)
    output = _run_checked([str(python), str(script_path)], run_env, home, timeout_s, f"script {script_path}")
    results = [line[len(RESULT_MARKER) :] for line in output.splitlines() if line.startswith(RESULT_MARKER)]
    return json.loads(results[-1]) if results else None


def _run_checked(command: list[str], env: dict[str, str], cwd: Path, timeout_s: float, what: str) -> str:
    try:
        done = subprocess.run(
            command,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.output if isinstance(exc.output, str) else (exc.output or b"").decode(errors="replace")
        raise AirflowScriptError(f"{what} timed out after {timeout_s:.0f} s:\n{_tail(output)}") from exc
    if done.returncode != 0:
        raise AirflowScriptError(f"{what} exited with {done.returncode}:\n{_tail(done.stdout)}")
    return done.stdout


_DAGBAG_SCRIPT = """
import json
try:
    from airflow.dag_processing.dagbag import DagBag  # Airflow 3
except ImportError:
    from airflow.models.dagbag import DagBag  # Airflow 2
bag = DagBag({folder!r})
print({marker!r} + json.dumps({{
    "dags": {{dag_id: dag.fileloc for dag_id, dag in bag.dags.items()}},
    "import_errors": {{str(k): str(v) for k, v in bag.import_errors.items()}},
}}))
"""

_DAG_TEST_SCRIPT = """
import json
try:
    from airflow.dag_processing.dagbag import DagBag  # Airflow 3
except ImportError:
    from airflow.models.dagbag import DagBag  # Airflow 2
bag = DagBag({folder!r})
if bag.import_errors:
    raise SystemExit("import errors: " + json.dumps({{str(k): str(v) for k, v in bag.import_errors.items()}}))
dag = bag.get_dag({dag_id!r})
if dag is None:
    raise SystemExit("no DAG " + {dag_id!r} + " in " + {folder!r})
run = dag.test(run_conf=json.loads({conf_json!r}))
tis = run.get_task_instances() if hasattr(run, "get_task_instances") else []
print({marker!r} + json.dumps({{
    "state": str(getattr(run.state, "value", run.state)),
    "tasks": {{f"{{ti.task_id}}[{{ti.map_index}}]": str(getattr(ti.state, "value", ti.state)) for ti in tis}},
}}))
"""


def check_dag_folder(python: Path | str, dags_folder: Path | str, *, home: Path | str) -> dict[str, str]:
    """Import ``dags_folder`` with a DagBag in ``python``'s Airflow; return ``{dag_id: file}``.

    DagBag's safe mode skips files that do not contain both "airflow" and "dag": a DAG file that
    imports only ``jipfed.operators.compat`` must mention Airflow (e.g. in its docstring).

    Raises:
        AirflowScriptError: any import error (the message holds the tracebacks).
    """
    result = run_airflow_script(
        python,
        _DAGBAG_SCRIPT.format(folder=str(Path(dags_folder).resolve()), marker=RESULT_MARKER),
        home=home,
        dags_folder=dags_folder,
    )
    if result["import_errors"]:
        errors = "\n".join(f"{file}:\n{text}" for file, text in result["import_errors"].items())
        raise AirflowScriptError(f"import errors in {dags_folder} ({python}):\n{errors}")
    return dict(result["dags"])


def run_dag_test(
    python: Path | str,
    dags_folder: Path | str,
    dag_id: str,
    *,
    home: Path | str,
    run_conf: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """``dag.test(run_conf=...)`` of one DAG in ``python``'s Airflow (in-process executor).

    Returns:
        ``{"state": run state, "tasks": {"task_id[map_index]": state}}``.
    """
    script = _DAG_TEST_SCRIPT.format(
        folder=str(Path(dags_folder).resolve()),
        dag_id=dag_id,
        conf_json=json.dumps(dict(run_conf or {})),
        marker=RESULT_MARKER,
    )
    return run_airflow_script(
        python, script, home=home, dags_folder=dags_folder, env=env, timeout_s=timeout_s
    )


PROBE_DAG_ID = "jipfed_probe"

_PROBE_DAG = '''"""Probe DAG (Airflow 2 and 3) built only from jipfed.operators.compat names.

Params: x (integer >= 0), out_dir (folder). Writes <out_dir>/<run_id>.json with 2*x, a mapped
task's results and the templated value a custom BaseOperator saw.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from jipfed.operators.compat import BaseOperator, Param, dag, get_current_context, task


class TemplatedEcho(BaseOperator):
    """Returns its templated ``message``."""

    template_fields = ("message",)

    def __init__(self, *, message: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.message = message

    def execute(self, context):
        return self.message


@dag(
    dag_id="{dag_id}",
    schedule=None,
    start_date=dt.datetime(2024, 1, 1),
    catchup=False,
    params={{
        "x": Param(1, type="integer", minimum=0),
        "out_dir": Param("/tmp", type="string"),
    }},
)
def probe():
    @task
    def double() -> int:
        return 2 * get_current_context()["params"]["x"]

    @task
    def plus_one(value: int) -> int:
        return value + 1

    @task
    def report(doubled: int, mapped: list, echoed: str) -> str:
        context = get_current_context()
        out = Path(context["params"]["out_dir"]) / (context["run_id"].replace(":", "_") + ".json")
        out.write_text(json.dumps({{"doubled": doubled, "mapped": sorted(mapped), "echoed": echoed}}))
        return str(out)

    doubled = double()
    mapped = plus_one.expand(value=[1, 2, 3])
    echoed = TemplatedEcho(task_id="echo", message="x={{{{ params.x }}}}")
    report(doubled, mapped, echoed.output)


probe()
'''


def write_probe_dag(folder: Path | str, dag_id: str = PROBE_DAG_ID) -> Path:
    """Write the probe DAG (compat imports only; Params ``x``, ``out_dir``) into ``folder``.

    A run writes ``<out_dir>/<run_id with ':' as '_'>.json``:
    ``{"doubled": 2*x, "mapped": [2, 3, 4], "echoed": "x=<x>"}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dag_id}.py"
    path.write_text(_PROBE_DAG.format(dag_id=dag_id))
    return path
