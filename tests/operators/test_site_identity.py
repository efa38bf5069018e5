"""The site identity (Variable ``jipfed_site``) and the central endpoint's Connection (CentralHook)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jipfed.operators.compat import AirflowFailException
from jipfed.operators.hooks import CentralHook
from jipfed.operators.site.data import SelectCohortOperator
from jipfed.operators.site.failure import REASON_TAIL_CHARS, failure_reason, report_failure_to_central
from jipfed.operators.site.identity import (
    SiteIdentity,
    hosted_sites,
    identity_variable,
    load_identity,
    parse_identity,
)

from jipfed.imaging.preprocess import PreprocessConfig


def test_identity_defaults_and_full_form(tmp_path: Path) -> None:
    minimal = parse_identity("jipfed_site", json.dumps({"site_id": "site-a", "data_root": str(tmp_path)}))
    assert minimal == SiteIdentity(
        site_id="site-a",
        data_root=tmp_path,
        pacs_conn_id="jipfed_pacs_default",
        central_conn_id="jipfed_central_default",
        fetch_transport="dicomweb",
        default_dataset="BRATS-SYNTH",
        workflow_dir=tmp_path / "workflows",
        preprocess=PreprocessConfig(),
        device=None,
    )
    full = parse_identity(
        "v",
        {
            "site_id": "site-b",
            "data_root": str(tmp_path),
            "pacs_conn_id": "pacs_b",
            "central_conn_id": "central_b",
            "fetch_transport": "cget",
            "default_dataset": "BRATS 2021",
            "workflow_dir": str(tmp_path / "runs"),
            "preprocess": {"spacing_mm": [1, 1, 2], "spatial_size": [32, 32, 24]},
            "device": "cpu",
        },
    )
    assert full.preprocess == PreprocessConfig(spacing_mm=(1.0, 1.0, 2.0), spatial_size=(32, 32, 24))
    assert (
        full.run_dir("manual__2024-01-01T00:00:00+00:00")
        == tmp_path / "runs" / "manual__2024-01-01T00:00:00+00:00"
    )
    for bad in ("..", ".", "a/b", ""):
        with pytest.raises(ValueError, match="cannot name a run folder"):
            full.run_dir(bad)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (None, "Variable 'jipfed_site' is not set"),
        ("  ", "Variable 'jipfed_site' is not set"),
        ("{not json", "does not hold a valid site identity"),
        ('["site-a"]', "expected a JSON object"),
        ('{"site_id": "site-a"}', r"missing key\(s\) \['data_root'\]"),
        ('{"site_id": "site-a", "data_root": "/d", "pacs_conn": "x"}', r"unknown key\(s\) \['pacs_conn'\]"),
        ('{"site_id": "site a", "data_root": "/d"}', "invalid site id"),
        ('{"site_id": "site-a", "data_root": "data"}', "data_root must be an absolute path"),
        ('{"site_id": "site-a", "data_root": "/d", "workflow_dir": "/d"}', "over the caches"),
        ('{"site_id": "site-a", "data_root": "/d/x", "workflow_dir": "/d"}', "over the caches"),
        ('{"site_id": "site-a", "data_root": "/d", "workflow_dir": "/d/dicom"}', "over the caches"),
        (
            '{"site_id": "site-a", "data_root": "/d", "fetch_transport": "cmove"}',
            "fetch_transport must be one of",
        ),
        (
            '{"site_id": "site-a", "data_root": "/d", "central_conn_id": ""}',
            "central_conn_id must be a non-empty",
        ),
        (
            '{"site_id": "site-a", "data_root": "/d", "preprocess": {"size": 1}}',
            "preprocess must be an object",
        ),
        (
            '{"site_id": "site-a", "data_root": "/d", "preprocess": {"spatial_size": [0, 1, 1]}}',
            "spatial_size",
        ),
    ],
)
def test_invalid_identities_name_the_variable_and_the_problem(raw: str | None, match: str) -> None:
    with pytest.raises(ValueError, match=match) as error:
        parse_identity("jipfed_site", raw)
    assert "Variable 'jipfed_site'" in str(error.value)


def test_load_identity_reads_the_variable_at_run_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    value = json.dumps({"site_id": "site-b", "data_root": str(tmp_path)})
    monkeypatch.setenv("AIRFLOW_VAR_JIPFED_SITE__SITE-B", value)
    assert load_identity("jipfed_site__site-b", "site-b").site_id == "site-b"
    with pytest.raises(AirflowFailException, match="names site 'site-b', but this DAG is for site 'site-c'"):
        load_identity("jipfed_site__site-b", "site-c")
    with pytest.raises(AirflowFailException, match="Variable 'jipfed_site__site-c' is not set"):
        load_identity("jipfed_site__site-c", "site-c")


def test_hosted_sites_and_variable_names() -> None:
    assert hosted_sites({}) == [None] and hosted_sites({"JIPFED_HOSTED_SITES": " , "}) == [None]
    assert hosted_sites({"JIPFED_HOSTED_SITES": "site-a, site-b,"}) == ["site-a", "site-b"]
    with pytest.raises(ValueError, match="invalid site id in JIPFED_HOSTED_SITES"):
        hosted_sites({"JIPFED_HOSTED_SITES": "site-a,../x"})
    assert identity_variable() == "jipfed_site" and identity_variable("site-a") == "jipfed_site__site-a"


def test_failure_reason_keeps_the_end_of_the_message() -> None:
    assert failure_reason("fetch_dicom", RuntimeError("PACS down")) == "fetch_dicom failed: PACS down"
    assert failure_reason("convert", KeyError()) == "convert failed: KeyError"
    assert failure_reason("train_local", None) == "train_local failed: no error message"
    long = failure_reason("preprocess", ValueError("x" * 5000 + " the cause"))
    assert long.endswith(" the cause") and len(long) == len("preprocess failed: ...") + REASON_TAIL_CHARS


def test_failure_callback_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    report_failure_to_central({"exception": RuntimeError("boom")})  # a task without a work item
    assert "failed before this run had a work item: nothing to report" in caplog.text
    task = SelectCohortOperator(task_id="select_cohort")
    report_failure_to_central({"task": task, "exception": RuntimeError("boom")})  # no task instance
    assert "task select_cohort failed and the failure could not be reported to the central" in caplog.text


# -- CentralHook -------------------------------------------------------------------------------------


def set_conn(monkeypatch: pytest.MonkeyPatch, conn_id: str, value: dict) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(value))


def test_central_hook_builds_the_client_from_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (CentralHook.default_conn_name, CentralHook.conn_type) == ("jipfed_central_default", "http")
    set_conn(
        monkeypatch,
        "central_url",
        {
            "conn_type": "http",
            "host": "https://central.example/jipfed/",
            "password": "jipfed.site-a.abc",
            "extra": {"timeout_s": 5, "verify": "/etc/ca.pem"},
        },
    )
    hook = CentralHook(central_conn_id="central_url")
    assert hook.get_client_kwargs() == {
        "base_url": "https://central.example/jipfed",
        "token": "jipfed.site-a.abc",
        "timeout_s": 5.0,
        "verify": "/etc/ca.pem",
    }
    client = hook.get_conn()
    assert (client.base_url, client.timeout_s) == ("https://central.example/jipfed", 5.0)
    assert "jipfed.site-a.abc" not in repr(client)
    set_conn(
        monkeypatch,
        "central_host",
        {"conn_type": "http", "host": "central", "schema": "https", "port": 8443, "password": "t0ken"},
    )
    kwargs = CentralHook(central_conn_id="central_host").get_client_kwargs()
    assert (kwargs["base_url"], kwargs["timeout_s"], kwargs["verify"]) == ("https://central:8443", 60.0, True)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({}, "password must hold the site's token"),
        ({"password": "t", "extra": {"timeout": 5}}, r"unknown extra field\(s\) \['timeout'\]"),
        ({"password": "t", "extra": {"timeout_s": 0}}, "timeout_s 0 must be a number > 0"),
        ({"password": "t", "extra": {"timeout_s": True}}, "timeout_s True must be a number > 0"),
        ({"password": "t", "extra": {"verify": 1}}, "verify must be true, false or a CA bundle path"),
    ],
)
def test_central_hook_rejects_bad_connections(
    monkeypatch: pytest.MonkeyPatch, fields: dict, match: str
) -> None:
    set_conn(monkeypatch, "central_bad", {"conn_type": "http", "host": "http://c/jipfed", **fields})
    with pytest.raises(ValueError, match=f"connection 'central_bad': {match}"):
        CentralHook(central_conn_id="central_bad").get_client_kwargs()
