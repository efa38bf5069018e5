"""The operators and DAG files on Airflow 2.11, in .venv-af2 (created by scripts/setup.sh)."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from jipfed.testing.airflow import (
    PROBE_DAG_ID,
    RESULT_MARKER,
    AirflowScriptError,
    check_dag_folder,
    run_airflow_script,
    run_dag_test,
    write_probe_dag,
)

REPO = Path(__file__).resolve().parents[2]
AF2_VENV = REPO / ".venv-af2"
AF2_PYTHON = AF2_VENV / "bin" / "python"

RunInAirflow2 = Callable[..., Any]


@pytest.fixture(scope="module")
def af2_python() -> Path:
    if not AF2_PYTHON.exists():
        pytest.fail(
            f"{AF2_PYTHON} is missing: create the Airflow 2.11 venv with `make setup` "
            "(`make test` runs it)",
            pytrace=False,
        )
    return AF2_PYTHON


@pytest.fixture(scope="module")
def af2_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("af2-home")


@pytest.fixture(scope="module")
def run_in_airflow2(
    af2_python: Path, af2_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> RunInAirflow2:
    """``run_in_airflow2(script, dags_folder=None, env=None)``: run a script under Airflow 2.11.

    The script reports its result with ``print(RESULT_MARKER + json.dumps(value))``; the value is
    returned. A non-zero exit raises AirflowScriptError with the script's output.
    """
    empty_dags = tmp_path_factory.mktemp("af2-empty-dags")

    def run(script: str, *, dags_folder: Path | None = None, env: Mapping[str, str] | None = None) -> Any:
        return run_airflow_script(
            af2_python, textwrap.dedent(script), home=af2_home, dags_folder=dags_folder or empty_dags, env=env
        )

    return run


def test_compat_resolves_airflow2_names(run_in_airflow2: RunInAirflow2) -> None:
    result = run_in_airflow2(
        f"""
        import json
        from jipfed.operators import compat
        import airflow.decorators, airflow.models.baseoperator
        print({RESULT_MARKER!r} + json.dumps({{
            "v3": compat.AIRFLOW_V3,
            "version": compat.AIRFLOW_VERSION,
            "has_common_compat": compat.HAS_COMMON_COMPAT,
            "missing": [n for n in compat.__all__ if getattr(compat, n, None) is None],
            "not_native": [n for n in compat.NATIVE_LOCATIONS if getattr(compat, n) is not compat.native_import(n)],
            "dag_is_af2_decorator": compat.dag is airflow.decorators.dag,
            "operator_is_af2_model": compat.BaseOperator is airflow.models.baseoperator.BaseOperator,
            "event_trigger_is_base_trigger": compat.BaseEventTrigger is compat.BaseTrigger,
        }}))
        """
    )
    assert result == {
        "v3": False,
        "version": "2.11.0",
        "has_common_compat": True,
        "missing": [],
        "not_native": [],
        "dag_is_af2_decorator": True,
        "operator_is_af2_model": True,
        "event_trigger_is_base_trigger": True,
    }


def test_hooks_read_airflow2_connections(run_in_airflow2: RunInAirflow2, tmp_path: Path) -> None:
    env = {
        "AIRFLOW_CONN_PACS_AF2": json.dumps(
            {
                "conn_type": "jipfed_pacs",
                "host": "http://127.0.0.1:8042",
                "login": "alice",
                "password": "s3cret-pw",
                "extra": {"dimse_port": 4242, "calling_aet": "SITE_A"},
            }
        ),
        "AIRFLOW_CONN_STORE_AF2": "aws://key-id:secret-key@/?endpoint_url=http%3A%2F%2F127.0.0.1%3A9000&bucket=fl",
        "AIRFLOW_CONN_LOCAL_AF2": json.dumps({"conn_type": "fs", "extra": {"path": str(tmp_path / "store")}}),
        "AIRFLOW_CONN_SITE_AF2": json.dumps(
            {"conn_type": "http", "host": "site-a", "port": 8080, "login": "central", "password": "pw-12345"}
        ),
    }
    result = run_in_airflow2(
        f"""
        import json
        from jipfed.operators.compat import AirflowNotFoundException
        from jipfed.operators.hooks import AirflowApiHook, ModelStoreHook, PacsHook
        from jipfed.operators.hooks.pacs_hook import pacs_config_kwargs
        client = AirflowApiHook(airflow_api_conn_id="site_af2").get_conn()
        try:
            PacsHook(pacs_conn_id="missing_af2").get_conn()
            missing = "no error"
        except AirflowNotFoundException:
            missing = "AirflowNotFoundException"
        print({RESULT_MARKER!r} + json.dumps({{
            "pacs": pacs_config_kwargs(PacsHook.get_connection("pacs_af2")),
            "store": ModelStoreHook(model_store_conn_id="store_af2").get_store_config(),
            "pacs_config": repr(PacsHook(pacs_conn_id="pacs_af2").get_conn()),
            "local_store": type(ModelStoreHook(model_store_conn_id="local_af2").get_conn()).__name__,
            "api": [client.base_url, client.username, client.name],
            "missing": missing,
        }}))
        """,
        env=env,
    )
    assert result == {
        "pacs": {
            "dicomweb_url": "http://127.0.0.1:8042/dicom-web",
            "username": "alice",
            "password": "s3cret-pw",
            "dimse_host": "127.0.0.1",
            "dimse_port": 4242,
            "calling_aet": "SITE_A",
        },
        "store": {
            "kind": "s3",
            "endpoint_url": "http://127.0.0.1:9000",
            "region": None,
            "bucket": "fl",
            "prefix": "",
            "access_key": "key-id",
            "secret_key": "secret-key",
            "verify": True,
        },
        "pacs_config": (
            "PacsConfig(dicomweb_url='http://127.0.0.1:8042/dicom-web', username='alice', "
            "dimse_host='127.0.0.1', dimse_port=4242, called_aet='ORTHANC', calling_aet='SITE_A', timeout_s=60.0)"
        ),
        "local_store": "LocalFolderStore",
        "api": ["http://site-a:8080", "central", "connection 'site_af2'"],
        "missing": "AirflowNotFoundException",
    }


def test_probe_dag_runs_with_dag_test_on_airflow2(af2_python: Path, af2_home: Path, tmp_path: Path) -> None:
    dags = tmp_path / "dags"
    write_probe_dag(dags)
    assert check_dag_folder(af2_python, dags, home=af2_home) == {PROBE_DAG_ID: str(dags / "jipfed_probe.py")}
    result = run_dag_test(
        af2_python, dags, PROBE_DAG_ID, home=af2_home, run_conf={"x": 3, "out_dir": str(tmp_path)}
    )
    assert result["state"] == "success", result
    assert len(result["tasks"]) == 6 and set(result["tasks"].values()) == {"success"}
    outputs = list(tmp_path.glob("manual__*.json"))
    assert len(outputs) == 1
    assert json.loads(outputs[0].read_text()) == {"doubled": 6, "mapped": [2, 3, 4], "echoed": "x=3"}


def test_invalid_conf_is_rejected_on_airflow2(af2_python: Path, af2_home: Path, tmp_path: Path) -> None:
    dags = tmp_path / "dags"
    write_probe_dag(dags)
    with pytest.raises(AirflowScriptError, match="ParamValidationError"):
        run_dag_test(
            af2_python, dags, PROBE_DAG_ID, home=af2_home, run_conf={"x": "three", "out_dir": str(tmp_path)}
        )
    assert list(tmp_path.glob("manual__*.json")) == []


def test_import_error_is_reported_with_traceback(af2_python: Path, af2_home: Path, tmp_path: Path) -> None:
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "broken.py").write_text('"""An Airflow DAG file that fails."""\nimport no_such_module_for_dag\n')
    with pytest.raises(AirflowScriptError, match="no_such_module_for_dag"):
        check_dag_folder(af2_python, dags, home=af2_home)


def test_repo_dags_import_on_airflow2(af2_python: Path, af2_home: Path) -> None:
    dags = check_dag_folder(af2_python, REPO / "dags", home=af2_home)
    assert all(Path(f).is_relative_to(REPO / "dags") for f in dags.values())
