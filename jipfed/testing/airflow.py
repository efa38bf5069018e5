"""Airflow test helpers: one-off scripts, DagBag checks and ``dag.test`` in a given Airflow (2 or 3).

The ``airflow standalone`` launcher lives in :mod:`jipfed.local.airflow` (re-exported here).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jipfed.local.airflow import (  # noqa: F401  (re-exported for the tests)
    HEALTH_COMPONENTS,
    AirflowStandalone,
    AirflowStandaloneError,
    default_airflow_bin,
)
from jipfed.local.ports import free_port  # noqa: F401

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
