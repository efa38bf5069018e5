"""CentralClient's retries and errors against a real HTTP server that answers 503 a few times.

The server stands in for a proxy in front of the central (the endpoint itself never answers 503).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from jipfed.central.client import CentralClient, CentralError
from jipfed.central.serve import serve_in_thread


class Flaky:
    """Answers 503 to the first ``failures`` requests, then 200; counts requests."""

    def __init__(self) -> None:
        self.failures = 0
        self.calls = 0
        self.app = FastAPI()
        self.app.get("/healthz")(self.answer)
        self.app.put("/v1/experiments/{experiment}/rounds/{round_}/update")(self.answer)

    def answer(self) -> JSONResponse:
        self.calls += 1
        if self.calls <= self.failures:
            return JSONResponse({"detail": "proxy: upstream unavailable"}, 503)
        return JSONResponse({"status": "ok", "accepted": {"site": "site-a"}})


@pytest.fixture(scope="module")
def flaky() -> Iterator[tuple[Flaky, CentralClient]]:
    server = Flaky()
    url, stop = serve_in_thread(server.app)
    yield server, CentralClient(url, "jipfed.site-a.token", backoff_s=0.01)
    stop()


@pytest.mark.parametrize(("failures", "calls", "ok"), [(2, 3, True), (3, 3, False)])
def test_gets_are_tried_three_times_on_503(flaky, failures: int, calls: int, ok: bool) -> None:
    server, client = flaky
    server.failures, server.calls = failures, 0
    if ok:
        assert client.health()["status"] == "ok"
    else:
        with pytest.raises(CentralError, match="GET /healthz answered 503: proxy: upstream unavailable"):
            client.health()
    assert server.calls == calls


def test_uploads_are_not_retried(flaky) -> None:
    server, client = flaky
    server.failures, server.calls = 1, 0
    with pytest.raises(CentralError) as info:
        client.put_update("exp1", 3, b"payload", "{}", check=False)
    assert info.value.status_code == 503 and server.calls == 1
    assert "PUT /v1/experiments/exp1/rounds/3/update (experiment 'exp1', round 3)" in str(info.value)


def test_unreachable_central_fails_after_three_tries(closed_port: int) -> None:
    client = CentralClient(f"http://127.0.0.1:{closed_port}/jipfed", "jipfed.site-a.token", backoff_s=0.01)
    with pytest.raises(CentralError, match="no connection after 3 tries") as info:
        client.pending_work_dicts()
    assert info.value.status_code is None and info.value.path == "/v1/work"
    assert "jipfed.site-a.token" not in repr(client)
