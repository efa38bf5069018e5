"""Hooks built from real Airflow Connections (AIRFLOW_CONN_* environment variables, JSON and URI)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from jipfed.operators.compat import AirflowNotFoundException
from jipfed.operators.hooks import AirflowApiHook, ModelStoreHook, PacsHook
from jipfed.operators.hooks.pacs_hook import pacs_config_kwargs

from jipfed.airflow_rest import AirflowRestClient, AirflowRestError


def set_conn(monkeypatch: pytest.MonkeyPatch, conn_id: str, value: dict | str) -> None:
    """Define a Connection the way a deployment does: an AIRFLOW_CONN_<ID> variable."""
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{conn_id.upper()}", value if isinstance(value, str) else json.dumps(value)
    )


# -- PacsHook ------------------------------------------------------------------------------------


def pacs_kwargs(conn_id: str = "pacs_test") -> dict:
    return pacs_config_kwargs(PacsHook.get_connection(conn_id))


@pytest.mark.parametrize(
    ("hook_class", "default", "conn_type"),
    [
        (PacsHook, "jipfed_pacs_default", "jipfed_pacs"),
        (ModelStoreHook, "jipfed_model_store_default", "aws"),
        (AirflowApiHook, "jipfed_airflow_api_default", "http"),
    ],
)
def test_hooks_follow_provider_conventions(hook_class: type, default: str, conn_type: str) -> None:
    assert hook_class.default_conn_name == default
    assert getattr(hook_class(), hook_class.conn_name_attr) == default
    assert getattr(hook_class(**{hook_class.conn_name_attr: "other"}), hook_class.conn_name_attr) == "other"
    assert hook_class.conn_type == conn_type
    assert hook_class.hook_name


def test_pacs_full_url_host_and_all_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    set_conn(
        monkeypatch,
        "pacs_test",
        {
            "conn_type": "jipfed_pacs",
            "host": "http://127.0.0.1:8042",
            "login": "alice",
            "password": "s3cret-pw",
            "extra": {
                "dimse_port": 4242,
                "called_aet": "ORTHANC",
                "calling_aet": "SITE_A",
                "timeout_s": 12,
            },
        },
    )
    assert pacs_kwargs() == {
        "dicomweb_url": "http://127.0.0.1:8042/dicom-web",
        "username": "alice",
        "password": "s3cret-pw",
        "dimse_host": "127.0.0.1",
        "dimse_port": 4242,
        "called_aet": "ORTHANC",
        "calling_aet": "SITE_A",
        "timeout_s": 12.0,
    }


def test_pacs_bare_host_schema_port_custom_path_no_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    set_conn(
        monkeypatch,
        "pacs_test",
        {
            "conn_type": "jipfed_pacs",
            "host": "dcm4chee.store.svc",
            "schema": "https",
            "port": 8443,
            "extra": {"dicomweb_path": "dcm4chee-arc/aets/KAAPANA/rs/", "dimse_host": "10.0.0.5"},
        },
    )
    assert pacs_kwargs() == {
        "dicomweb_url": "https://dcm4chee.store.svc:8443/dcm4chee-arc/aets/KAAPANA/rs",
        "username": None,
        "password": None,
        "dimse_host": "10.0.0.5",
        "dimse_port": None,
    }


def test_pacs_uri_form_with_string_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    set_conn(monkeypatch, "pacs_test", "jipfed-pacs://bob:pw%40x@orthanc:8042/?dimse_port=4242&timeout_s=30")
    conn = PacsHook.get_connection("pacs_test")
    assert conn.conn_type == "jipfed_pacs"
    kwargs = pacs_config_kwargs(conn)
    assert kwargs["dicomweb_url"] == "http://orthanc:8042/dicom-web"
    assert (kwargs["username"], kwargs["password"]) == ("bob", "pw@x")
    assert (kwargs["dimse_host"], kwargs["dimse_port"], kwargs["timeout_s"]) == ("orthanc", 4242, 30.0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"dimse-port": 4242}, r"unknown extra field\(s\) \['dimse-port'\]"),
        ({"dimse_port": 70000}, "not a port number"),
        ({"dimse_port": "abc"}, "not an integer"),
        ({"dimse_port": True}, "not a port number"),
        ({"calling_aet": "A_MUCH_TOO_LONG_AE_TITLE"}, "not a valid AE title"),
        ({"called_aet": "BAD\\AET"}, "not a valid AE title"),
        ({"timeout_s": 0}, "must be > 0"),
        ({"timeout_s": "soon"}, "must be > 0"),
    ],
)
def test_pacs_bad_extras_name_the_connection(
    monkeypatch: pytest.MonkeyPatch, extra: dict, message: str
) -> None:
    set_conn(
        monkeypatch,
        "pacs_test",
        {"conn_type": "jipfed_pacs", "host": "http://127.0.0.1:8042", "extra": extra},
    )
    with pytest.raises(ValueError, match=message) as info:
        pacs_kwargs()
    assert "'pacs_test'" in str(info.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"host": ""}, "host is empty"),
        ({"host": "ftp://pacs:21"}, "not an http"),
        ({"host": "pacs", "schema": "dicom-web"}, "put the full URL"),
    ],
)
def test_pacs_bad_host(monkeypatch: pytest.MonkeyPatch, fields: dict, message: str) -> None:
    set_conn(monkeypatch, "pacs_test", {"conn_type": "jipfed_pacs", **fields})
    with pytest.raises(ValueError, match=message):
        pacs_kwargs()


def test_pacs_config_errors_name_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    set_conn(
        monkeypatch, "pacs_test", {"conn_type": "jipfed_pacs", "host": "http://127.0.0.1:8042", "login": "u"}
    )
    with pytest.raises(ValueError, match="connection 'pacs_test': username and password"):
        PacsHook(pacs_conn_id="pacs_test").get_conn()


def test_pacs_hook_missing_connection() -> None:
    with pytest.raises(AirflowNotFoundException):
        PacsHook(pacs_conn_id="no_such_pacs_conn").get_conn()


def test_pacs_hook_get_conn_returns_pacs_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from jipfed.imaging.pacs import PacsConfig

    set_conn(
        monkeypatch,
        "pacs_test",
        {"conn_type": "jipfed_pacs", "host": "http://127.0.0.1:8042", "extra": {"dimse_port": 4242}},
    )
    config = PacsHook(pacs_conn_id="pacs_test").get_conn()
    assert isinstance(config, PacsConfig)
    assert config.dicomweb_url == "http://127.0.0.1:8042/dicom-web"
    assert (config.username, config.password) == (None, None)
    assert (config.dimse_host, config.dimse_port) == ("127.0.0.1", 4242)
    assert (config.called_aet, config.calling_aet, config.timeout_s) == ("ORTHANC", "JIPFED", 60.0)


# -- ModelStoreHook ------------------------------------------------------------------------------


def test_model_store_minio_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    set_conn(
        monkeypatch,
        "store_test",
        {
            "conn_type": "aws",
            "login": "minio-key",
            "password": "minio-secret",
            "extra": {
                "endpoint_url": "http://127.0.0.1:9000/",
                "region_name": "eu-central-1",
                "bucket": "fl",
            },
        },
    )
    assert ModelStoreHook(model_store_conn_id="store_test").get_store_config() == {
        "kind": "s3",
        "endpoint_url": "http://127.0.0.1:9000",
        "region": "eu-central-1",
        "bucket": "fl",
        "prefix": "",
        "access_key": "minio-key",
        "secret_key": "minio-secret",
        "verify": True,
    }


def test_model_store_aws_keys_in_extras_and_default_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    set_conn(
        monkeypatch,
        "store_test",
        {"conn_type": "aws", "extra": {"aws_access_key_id": "AK", "aws_secret_access_key": "SK"}},
    )
    config = ModelStoreHook(model_store_conn_id="store_test").get_store_config()
    assert (config["endpoint_url"], config["bucket"]) == (None, "jipfed")
    assert (config["access_key"], config["secret_key"]) == ("AK", "SK")


def test_model_store_local_folder(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    set_conn(monkeypatch, "store_test", {"conn_type": "fs", "extra": {"path": str(tmp_path)}})
    assert ModelStoreHook(model_store_conn_id="store_test").get_store_config() == {
        "kind": "local",
        "root": str(tmp_path),
    }


@pytest.mark.parametrize(
    ("conn", "message"),
    [
        ({"conn_type": "postgres", "host": "db"}, "is not a model store"),
        ({"conn_type": "fs", "extra": {}}, "needs extra 'path'"),
        ({"conn_type": "aws", "login": "only-key"}, "both access key and secret key"),
        ({"conn_type": "aws", "extra": {"endpoint_url": "127.0.0.1:9000"}}, "not an http"),
        ({"conn_type": "aws", "extra": {"bucket_name": "x"}}, "unknown extra"),
    ],
)
def test_model_store_bad_connections(monkeypatch: pytest.MonkeyPatch, conn: dict, message: str) -> None:
    set_conn(monkeypatch, "store_test", conn)
    with pytest.raises(ValueError, match=message):
        ModelStoreHook(model_store_conn_id="store_test").get_store_config()


def test_model_store_hook_opens_a_local_store(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from jipfed.storage.local import LocalFolderStore

    set_conn(monkeypatch, "store_test", {"conn_type": "fs", "extra": {"path": str(tmp_path / "store")}})
    store = ModelStoreHook(model_store_conn_id="store_test").get_conn()
    assert isinstance(store, LocalFolderStore)
    assert store.root == tmp_path / "store"


def test_model_store_hook_opens_an_s3_store(monkeypatch: pytest.MonkeyPatch) -> None:
    from jipfed.storage.s3 import S3Store

    set_conn(
        monkeypatch,
        "store_test",
        {
            "conn_type": "aws",
            "login": "minio-key",
            "password": "minio-secret",
            "extra": {"endpoint_url": "http://127.0.0.1:9000", "bucket": "fl", "prefix": "/central/"},
        },
    )
    store = ModelStoreHook(model_store_conn_id="store_test").get_conn()
    assert isinstance(store, S3Store)
    assert (store.endpoint_url, store.bucket, store.prefix) == ("http://127.0.0.1:9000", "fl", "central")


# -- AirflowApiHook ------------------------------------------------------------------------------


def test_airflow_api_hook_builds_client(monkeypatch: pytest.MonkeyPatch) -> None:
    set_conn(
        monkeypatch,
        "site_a_api",
        {
            "conn_type": "http",
            "host": "https://site-a.example/flow/",
            "login": "central",
            "password": "pw-123456",
            "extra": {"timeout_s": 5, "verify": False},
        },
    )
    hook = AirflowApiHook(airflow_api_conn_id="site_a_api")
    client = hook.get_conn()
    assert isinstance(client, AirflowRestClient)
    assert hook.get_conn() is client  # one client per hook: the token is reused
    assert client.base_url == "https://site-a.example/flow"
    assert (client.username, client.timeout_s, client.name) == ("central", 5.0, "connection 'site_a_api'")
    assert "pw-123456" not in repr(client)


@pytest.mark.parametrize(
    ("conn", "message"),
    [
        ({"conn_type": "http", "host": "h", "login": "u"}, "both login and password"),
        ({"conn_type": "http", "host": "h", "extra": {"token": "x"}}, "unknown extra"),
        ({"conn_type": "http", "host": "h", "extra": {"timeout_s": "x"}}, "not a number"),
        ({"conn_type": "http", "host": "h", "extra": {"verify": 1}}, "verify must be"),
    ],
)
def test_airflow_api_bad_connections(monkeypatch: pytest.MonkeyPatch, conn: dict, message: str) -> None:
    set_conn(monkeypatch, "site_a_api", conn)
    with pytest.raises(ValueError, match=message):
        AirflowApiHook(airflow_api_conn_id="site_a_api").get_conn()


def test_airflow_api_unreachable_site_error_names_connection_and_url(
    monkeypatch: pytest.MonkeyPatch, closed_port: int
) -> None:
    port = closed_port  # nothing listens there
    set_conn(
        monkeypatch,
        "site_b_api",
        {"conn_type": "http", "host": "127.0.0.1", "port": port, "login": "u", "password": "p-12345"},
    )
    hook = AirflowApiHook(airflow_api_conn_id="site_b_api")
    with pytest.raises(AirflowRestError) as info:
        hook.trigger_dag_run("site_dag", {"round": 1}, "round-1")
    message = str(info.value)
    assert "connection 'site_b_api'" in message
    assert f"http://127.0.0.1:{port}/auth/token" in message
    ok, text = hook.test_connection()
    assert not ok and f"127.0.0.1:{port}" in text


def test_rest_client_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="http"):
        AirflowRestClient("site-a:8080")
    with pytest.raises(ValueError, match="both username and password"):
        AirflowRestClient("http://site-a:8080", "user")
    with pytest.raises(ValueError, match="timeout_s"):
        AirflowRestClient("http://site-a:8080", timeout_s=0)


def test_rest_client_and_harness_do_not_import_airflow() -> None:
    code = "import sys, jipfed.airflow_rest, jipfed.testing.airflow; print(sorted(m for m in sys.modules if m.split('.')[0] == 'airflow'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


class _BusyDatabase(ThreadingHTTPServer):
    """Answers ``busy`` requests with Airflow's 500 "Database error" (SQLite's lock in a standalone),
    then 200; records each request's method."""

    def __init__(self, busy: int) -> None:
        self.busy, self.methods = busy, []

        class Handler(BaseHTTPRequestHandler):
            def do_any(handler) -> None:  # noqa: N805 (the handler, not the server)
                handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
                self.methods.append(handler.command)
                status = 500 if len(self.methods) <= self.busy else 200
                body = json.dumps({"reason": "Database error"} if status == 500 else {"ok": True}).encode()
                handler.send_response(status)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            do_GET = do_PATCH = do_POST = do_any

            def log_message(handler, *args: object) -> None:  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.mark.parametrize(("busy", "answered"), [(1, True), (2, True), (3, False)])
def test_rest_client_sends_an_idempotent_request_again_while_the_database_is_busy(
    busy: int, answered: bool
) -> None:
    server = _BusyDatabase(busy)
    try:
        client = AirflowRestClient(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=5)
        if answered:
            assert client.set_paused("dag", True) == {"ok": True}
        else:
            with pytest.raises(AirflowRestError) as failed:
                client.set_paused("dag", True)
            assert failed.value.status_code == 500 and "Database error" in str(failed.value)
        assert server.methods == ["PATCH"] * min(busy + 1, 3)
    finally:
        server.shutdown()


def test_rest_client_never_repeats_a_post() -> None:
    server = _BusyDatabase(1)
    try:
        client = AirflowRestClient(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=5)
        with pytest.raises(AirflowRestError):
            client.trigger_dag_run("dag", {})
        assert server.methods == ["POST"]
    finally:
        server.shutdown()
