"""The central Connection's signing extras: the site's key file and the central's public key."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from airflow.models.connection import Connection

from jipfed.cli import main
from jipfed.federation.signing import public_key_raw
from jipfed.tasks.connections import central_client_kwargs


def central_conn(**extra: str) -> Connection:
    return Connection(
        conn_id="jipfed_central_default",
        conn_type="http",
        host="https://central.example.org/jipfed",
        password="jipfed.site-a.token",
        extra=json.dumps(extra),
    )


def test_site_key_file_and_central_key_reach_the_client(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    key_file = tmp_path / "keys" / "site-a.pem"
    assert main(["site-key", "--out", str(key_file)]) == 0
    printed = capsys.readouterr().out.strip()
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    central_key = base64.b64encode(bytes(range(32))).decode("ascii")
    kwargs = central_client_kwargs(central_conn(signing_key_file=str(key_file), central_public_key=central_key))
    assert base64.b64encode(public_key_raw(kwargs["signing_key"])).decode("ascii") == printed
    assert kwargs["central_public_key"] == central_key
    assert "signing_key" not in central_client_kwargs(central_conn())
    with pytest.raises(SystemExit, match="exists"):
        main(["site-key", "--out", str(key_file)])


def test_a_bad_key_file_is_named_without_its_contents(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0LXZhbHVl\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="signing_key_file .*bad.pem.* is not a readable Ed25519") as exc:
        central_client_kwargs(central_conn(signing_key_file=str(bad)))
    assert "c2VjcmV0LXZhbHVl" not in str(exc.value)
    with pytest.raises(ValueError, match="central_public_key"):
        central_client_kwargs(central_conn(central_public_key="not-a-key"))
