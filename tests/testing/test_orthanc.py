"""OrthancServer against the real Orthanc binary: config, auth, stop/restart, startup errors.

These tests fail (not skip) when Orthanc or its DICOMweb plugin is missing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from jipfed.imaging.dicomweb import query_series
from jipfed.imaging.pacs import PacsConfig
from jipfed.testing.dicom_samples import write_sample_dataset
from jipfed.testing.orthanc import OrthancError, OrthancServer


def test_start_auth_stop_restart() -> None:
    with OrthancServer(password="s3cret-pw") as server:
        workdir = server.workdir
        assert workdir is not None
        auth = (server.username, server.password)
        system = requests.get(f"{server.base_url}/system", auth=auth, timeout=5)
        assert system.status_code == 200
        assert system.json()["DicomAet"] == "ORTHANC"
        assert system.json()["DicomPort"] == server.dicom_port
        assert requests.get(f"{server.base_url}/system", timeout=5).status_code == 401
        assert (
            requests.get(f"{server.base_url}/system", auth=("jipfed", "wrong"), timeout=5).status_code == 401
        )
        assert requests.get(f"{server.dicomweb_url}/studies", timeout=5).status_code == 401
        assert requests.get(f"{server.dicomweb_url}/studies", auth=auth, timeout=5).status_code == 200

        config = server.pacs_config
        assert config == PacsConfig(
            dicomweb_url=f"http://127.0.0.1:{server.http_port}/dicom-web",
            username="jipfed",
            password="s3cret-pw",
            dimse_port=server.dicom_port,
        )
        written = json.loads((workdir / "config.json").read_text())
        assert written["RemoteAccessAllowed"] is False
        assert written["AuthenticationEnabled"] is True
        modality = written["DicomModalities"]["jipfed"]
        assert modality["AET"] == "JIPFED"
        assert all(modality[k] for k in ("AllowFind", "AllowGet", "AllowMove", "AllowStore"))

        ports = (server.http_port, server.dicom_port)
        server.stop()  # "PACS down"
        assert not server.running
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{server.base_url}/system", auth=auth, timeout=5)
        server.stop()  # idempotent
        server.start()
        assert (server.http_port, server.dicom_port) == ports
        assert requests.get(f"{server.base_url}/system", auth=auth, timeout=5).status_code == 200
        assert "Orthanc has started" in server.log_tail()
    assert not workdir.exists()


def test_missing_binary_or_plugin(tmp_path: Path) -> None:
    with pytest.raises(OrthancError, match="binary not found at .*nope"):
        OrthancServer(tmp_path / "w", binary=tmp_path / "nope").start()
    with pytest.raises(OrthancError, match="DICOMweb plugin not found at .*missing.so"):
        OrthancServer(tmp_path / "w", dicomweb_plugin=tmp_path / "missing.so").start()


def test_startup_failure_reports_log(tmp_path: Path) -> None:
    fake = tmp_path / "fake-orthanc"
    fake.write_text("#!/bin/sh\necho 'E0101 cannot open the database: boom'\nexit 3\n")
    fake.chmod(0o755)
    server = OrthancServer(tmp_path / "w", binary=fake)
    with pytest.raises(OrthancError, match=r"(?s)exited during startup \(code 3\).*cannot open the database"):
        server.start()
    assert not server.running


def test_validation() -> None:
    with pytest.raises(ValueError, match="username"):
        OrthancServer(username="a:b")
    with pytest.raises(ValueError, match="startup_timeout_s"):
        OrthancServer(startup_timeout_s=0)
    with pytest.raises(OrthancError, match="not been started"):
        _ = OrthancServer().base_url


def test_cli_serve_uploads_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """``jipfed pacs serve`` in a subprocess: Ctrl-C (SIGINT to its process group) stops it cleanly."""
    written = write_sample_dataset(tmp_path / "src", n_cases=1, study_description="SERVE TEST", seed=8)
    command = [
        sys.executable,
        "-m",
        "jipfed.cli",
        "pacs",
        "serve",
        "--dir",
        str(tmp_path / "pacs"),
        "--upload",
    ]
    process = subprocess.Popen(
        [*command, str(tmp_path / "src")], stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        ready = None
        assert process.stderr is not None
        for line in process.stderr:
            ready = re.search(r"PACS ready: DICOMweb (\S+) user (\S+) password (\S+)", line)
            if ready:
                break
        assert ready, "serve ended without announcing the PACS"
        config = PacsConfig(dicomweb_url=ready[1], username=ready[2], password=ready[3])
        found = {r.series_uid for r in query_series(config, StudyDescription="SERVE TEST")}
        assert found == {s.series_uid for s in written}
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=120) == 0  # its stop takes <= 15 s + SIGKILL; 120 s only catches a hang
        with pytest.raises(requests.ConnectionError):
            requests.get(ready[1], timeout=5)
        workdir = tmp_path / "pacs"  # kept, with its data, for the next ``serve --dir``
        assert "Orthanc has stopped" in (workdir / "orthanc.log").read_text()
        assert (workdir / "config.json").is_file() and any((workdir / "storage").iterdir())
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
