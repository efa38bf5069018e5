"""operators/compat.py on the installed Airflow 3 (Airflow 2: tests/airflow/test_airflow2.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import airflow
import pytest
from jipfed.operators import compat

from jipfed.testing.airflow import (
    PROBE_DAG_ID,
    AirflowScriptError,
    check_dag_folder,
    run_dag_test,
    write_probe_dag,
)

REPO = Path(__file__).resolve().parents[2]


def test_version_flag_matches_installed_airflow() -> None:
    assert airflow.__version__ == compat.AIRFLOW_VERSION
    assert compat.AIRFLOW_V3 is (int(airflow.__version__.split(".")[0]) >= 3)
    assert compat.AIRFLOW_V3, "the project's main venv is expected to run Airflow 3"


def test_every_exported_name_resolves() -> None:
    missing = [name for name in compat.__all__ if getattr(compat, name, None) is None]
    assert missing == []


def test_common_compat_names_equal_native_fallbacks() -> None:
    assert compat.HAS_COMMON_COMPAT
    different = [n for n in compat.NATIVE_LOCATIONS if getattr(compat, n) is not compat.native_import(n)]
    assert different == []


def test_airflow3_names_come_from_the_task_sdk() -> None:
    import airflow.sdk

    assert compat.dag is airflow.sdk.dag
    assert compat.BaseOperator is airflow.sdk.BaseOperator
    assert compat.BaseHook is airflow.sdk.BaseHook
    assert issubclass(compat.BaseEventTrigger, compat.BaseTrigger)
    assert compat.BaseEventTrigger is not compat.BaseTrigger


def test_native_import_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="no native location"):
        compat.native_import("NoSuchThing")


def test_trigger_event_round_trip() -> None:
    event = compat.TriggerEvent({"status": "done", "n": 3})
    assert event.payload == {"status": "done", "n": 3}


@pytest.fixture(scope="module")
def af3_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("af3-home")


def test_probe_dag_runs_with_dag_test(tmp_path: Path, af3_home: Path) -> None:
    dags = tmp_path / "dags"
    write_probe_dag(dags)
    assert check_dag_folder(sys.executable, dags, home=af3_home) == {
        PROBE_DAG_ID: str(dags / "jipfed_probe.py")
    }
    result = run_dag_test(
        sys.executable, dags, PROBE_DAG_ID, home=af3_home, run_conf={"x": 7, "out_dir": str(tmp_path)}
    )
    assert result["state"] == "success", result
    assert set(result["tasks"].values()) == {"success"}
    assert len(result["tasks"]) == 6  # double, 3 mapped plus_one, echo, report
    outputs = list(tmp_path.glob("manual__*.json"))
    assert len(outputs) == 1
    assert json.loads(outputs[0].read_text()) == {"doubled": 14, "mapped": [2, 3, 4], "echoed": "x=7"}


def test_invalid_conf_is_rejected_before_any_task(tmp_path: Path, af3_home: Path) -> None:
    dags = tmp_path / "dags"
    write_probe_dag(dags)
    with pytest.raises(AirflowScriptError, match="ParamValidationError"):
        run_dag_test(
            sys.executable, dags, PROBE_DAG_ID, home=af3_home, run_conf={"x": -1, "out_dir": str(tmp_path)}
        )
    assert list(tmp_path.glob("manual__*.json")) == []


def test_repo_dags_import_without_errors(af3_home: Path) -> None:
    dags = check_dag_folder(sys.executable, REPO / "dags", home=af3_home)
    assert all(Path(f).is_relative_to(REPO / "dags") for f in dags.values())
