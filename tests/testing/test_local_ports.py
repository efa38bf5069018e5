"""Launchers that pick free ports start again on fresh ones when another process took one first."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from jipfed.local import orthanc
from jipfed.local.ports import free_port, port_taken


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process holds (listening) on 127.0.0.1 — as when it grabbed a picked port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_orthanc_starts_on_fresh_ports_when_a_picked_one_was_taken(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, taken_port: int
) -> None:
    picks = iter([taken_port])
    monkeypatch.setattr(orthanc, "free_port", lambda: next(picks, None) or free_port())
    with orthanc.OrthancServer(tmp_path / "pacs") as pacs:
        assert pacs.running and taken_port not in (pacs.http_port, pacs.dicom_port)
        assert port_taken(pacs.log_tail(chars=None))  # the first attempt failed on the taken port


def test_a_port_given_by_the_caller_is_not_replaced(tmp_path: Path, taken_port: int) -> None:
    with pytest.raises(orthanc.OrthancError, match="exited during startup") as info:
        orthanc.OrthancServer(tmp_path / "pacs", http_port=taken_port, dicom_port=free_port()).start()
    assert info.value.port_taken


def test_port_taken_reads_the_usual_complaints() -> None:
    assert port_taken("OSError: [Errno 98] Address already in use")
    assert port_taken("The TCP port of the HTTP server is privileged or already in use:  (port = 8042)")
    assert not port_taken("Orthanc has started")
