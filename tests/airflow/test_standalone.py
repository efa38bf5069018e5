"""A real `airflow standalone` (Airflow 3): REST trigger through AirflowApiHook, JWT auth."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from jipfed.operators.hooks import AirflowApiHook

from jipfed.airflow_rest import AirflowRestError
from jipfed.testing.airflow import PROBE_DAG_ID, AirflowStandalone, AirflowStandaloneError, write_probe_dag

pytestmark = pytest.mark.slow

JWT_LIFETIME_S = 4

FAILING_DAG = '''"""An Airflow DAG whose only task fails."""
import datetime as dt

from jipfed.operators.compat import dag, task


@dag(dag_id="jipfed_fails", schedule=None, start_date=dt.datetime(2024, 1, 1), catchup=False)
def fails():
    @task(retries=0)
    def explode() -> None:
        raise ValueError("boom-4711")

    explode()


fails()
'''


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowStandalone]:
    root = tmp_path_factory.mktemp("standalone")
    write_probe_dag(root / "dags")
    (root / "dags" / "jipfed_fails.py").write_text(FAILING_DAG)
    env = {
        # Short-lived REST tokens, so that the test sees one expire and the client log in again.
        "AIRFLOW__API_AUTH__JWT_EXPIRATION_TIME": str(JWT_LIFETIME_S),
        "AIRFLOW__API_AUTH__JWT_LEEWAY": "0",
    }
    with AirflowStandalone(home=root / "home", dags_folder=root / "dags", env=env) as af:
        af.wait_for_dag(PROBE_DAG_ID, timeout_s=300)
        yield af


@pytest.fixture()
def hook(standalone: AirflowStandalone, monkeypatch: pytest.MonkeyPatch) -> AirflowApiHook:
    conn = {
        "conn_type": "http",
        "host": "127.0.0.1",
        "port": standalone.port,
        "login": standalone.username,
        "password": standalone.password,
    }
    monkeypatch.setenv("AIRFLOW_CONN_SITE_UNDER_TEST", json.dumps(conn))
    return AirflowApiHook(airflow_api_conn_id="site_under_test")


def expires_at(token: str) -> float:
    """The ``exp`` claim of a JWT (epoch seconds), read without checking the signature."""
    payload = token.split(".")[1]
    return float(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])


def get_with_a_fresh_token(standalone: AirflowStandalone, url: str) -> requests.Response:
    """GET ``url`` with a new token. Tokens live 4 s here: a 401 after the token's own expiry (a loaded
    machine) is retried with another token; a 401 while the token was valid is returned."""
    for _ in range(5):
        token = standalone.client.fetch_token()
        answer = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        if answer.status_code != 401 or time.time() < expires_at(token):
            return answer
    raise AssertionError(f"five {JWT_LIFETIME_S} s tokens expired before one request was answered")


def test_api_requires_a_valid_token(standalone: AirflowStandalone) -> None:
    url = f"{standalone.base_url}/api/v2/dags/{PROBE_DAG_ID}"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer not-a-jwt"}, timeout=10).status_code == 403
    wrong = requests.post(
        f"{standalone.base_url}/auth/token",
        json={"username": standalone.username, "password": "wrong"},
        timeout=10,
    )
    assert wrong.status_code == 401
    answer = get_with_a_fresh_token(standalone, url)
    assert answer.status_code == 200 and answer.json()["dag_id"] == PROBE_DAG_ID


def test_trigger_over_rest_runs_the_dag(
    standalone: AirflowStandalone, hook: AirflowApiHook, tmp_path: Path
) -> None:
    assert hook.unpause(PROBE_DAG_ID)["is_paused"] is False
    run = hook.trigger_dag_run(
        PROBE_DAG_ID, {"x": 20, "out_dir": str(tmp_path)}, "rest-run-1", note="from test"
    )
    assert (run["dag_run_id"], run["logical_date"], run["conf"]["x"]) == ("rest-run-1", None, 20)
    # A retried trigger with the same run id: 409 unless exist_ok.
    with pytest.raises(AirflowRestError, match="409") as info:
        hook.trigger_dag_run(PROBE_DAG_ID, {"x": 20, "out_dir": str(tmp_path)}, "rest-run-1")
    assert f"127.0.0.1:{standalone.port}" in str(info.value)
    assert hook.trigger_dag_run(PROBE_DAG_ID, {}, "rest-run-1", exist_ok=True)["conf"]["x"] == 20

    finished = hook.get_conn().wait_for_dag_run(PROBE_DAG_ID, "rest-run-1", timeout_s=300, poll_s=0.5)
    assert finished["state"] == "success", standalone.failed_task_logs(PROBE_DAG_ID, "rest-run-1")
    assert hook.get_dag_run_state(PROBE_DAG_ID, "rest-run-1") == "success"
    tis = hook.list_task_instances(PROBE_DAG_ID, "rest-run-1")
    assert sorted((ti["task_id"], ti["map_index"]) for ti in tis) == [
        ("double", -1),
        ("echo", -1),
        ("plus_one", 0),
        ("plus_one", 1),
        ("plus_one", 2),
        ("report", -1),
    ]
    assert {ti["state"] for ti in tis} == {"success"}
    assert json.loads((tmp_path / "rest-run-1.json").read_text()) == {
        "doubled": 40,
        "mapped": [2, 3, 4],
        "echoed": "x=20",
    }


def test_invalid_conf_is_refused_with_the_reason(hook: AirflowApiHook) -> None:
    with pytest.raises(AirflowRestError, match="400") as info:
        hook.trigger_dag_run(PROBE_DAG_ID, {"x": "many"}, "rest-bad-conf")
    assert "connection 'site_under_test'" in str(info.value) and "x" in str(info.value)
    with pytest.raises(AirflowRestError, match="404"):
        hook.get_dag_run(PROBE_DAG_ID, "rest-bad-conf")
    with pytest.raises(AirflowRestError, match="404"):
        hook.unpause("no_such_dag")


def test_expired_token_is_renewed(standalone: AirflowStandalone, hook: AirflowApiHook) -> None:
    client = hook.get_conn()
    old = client.token()
    url = f"{standalone.base_url}/api/v2/dags/{PROBE_DAG_ID}"
    deadline = time.monotonic() + 120  # the event is the server refusing the token, not a sleep
    while (
        status := requests.get(url, headers={"Authorization": f"Bearer {old}"}, timeout=10).status_code
    ) == 200:
        assert time.monotonic() < deadline, f"a {JWT_LIFETIME_S} s token still accepted after 120 s"
        time.sleep(0.2)
    assert status == 401
    assert hook.get_conn().get_dag(PROBE_DAG_ID)["dag_id"] == PROBE_DAG_ID
    assert client.token() != old


def test_failed_run_error_quotes_the_task_log(standalone: AirflowStandalone) -> None:
    standalone.wait_for_dag("jipfed_fails", timeout_s=300)
    with pytest.raises(AirflowStandaloneError, match="ended failed") as info:
        standalone.run_dag("jipfed_fails", run_id="fails-1", timeout_s=300)
    assert "explode" in str(info.value) and "boom-4711" in str(info.value)
