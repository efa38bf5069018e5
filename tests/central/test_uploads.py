"""Uploads: authorised before the body is read, streamed with a model-derived limit, committed atomically."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import safetensors.torch
import torch

from jipfed.central.client import CentralError, CentralRefused
from jipfed.central.uploads import UpdateManifest, limits_for, model_bytes
from jipfed.federation.arrival import arrival_key
from jipfed.storage.base import ObjectExistsError
from jipfed.storage.local import LocalFolderStore
from jipfed.training.local import LocalTrainer

from .helpers import Central, start, train

UPDATE_PATH = "/v1/experiments/exp1/rounds/0/update"


class CrashBeforeManifest(LocalFolderStore):
    """A store whose process 'dies' between the payload and the manifest of an update."""

    crash = True

    def put_stream(self, key, stream, length, *, overwrite=False):  # type: ignore[override]
        if self.crash and key.endswith("/updates/site-a.json"):
            raise OSError("simulated crash between the two writes of an update")
        super().put_stream(key, stream, length, overwrite=overwrite)


def test_a_half_written_update_is_replaced_on_retry_not_a_duplicate(
    tmp_path: Path, serve, trainers: dict[str, LocalTrainer]
) -> None:
    store = CrashBeforeManifest(tmp_path / "store")
    central: Central = serve(store)
    exp_store = start(store)
    a = central.client("site-a")
    [item] = a.pending_work()
    encoded = train(a, trainers["site-a"], "site-a", item)
    with pytest.raises(CentralError) as crashed:
        a.put_update("exp1", 0, encoded.payload, encoded.manifest.to_json())
    assert crashed.value.status_code == 500
    assert exp_store.list_updates(0) == []  # nothing committed
    # Leave a payload without manifest behind, as a crash after the first write would.
    store.put_bytes(exp_store.layout.update(0, "site-a"), b"half written")
    store.crash = False
    assert [w.ticket.step for w in a.pending_work()] == [0]  # the site still owes its update
    accepted = a.put_update("exp1", 0, encoded.payload, encoded.manifest.to_json())
    assert accepted["sha256"] == encoded.manifest.sha256
    assert exp_store.load_update(0, "site-a")[0] == encoded.payload
    with pytest.raises(CentralRefused) as again:
        a.put_update("exp1", 0, encoded.payload, encoded.manifest.to_json())
    assert again.value.code == "duplicate"


def test_an_upload_is_checked_once_while_it_streams_in_and_the_check_is_recorded(
    local_store: LocalFolderStore, serve, trainers: dict[str, LocalTrainer]
) -> None:
    central: Central = serve(local_store)
    exp_store = start(local_store)
    a = central.client("site-a")
    [item] = a.pending_work()
    encoded = train(a, trainers["site-a"], "site-a", item)
    # hashed correctly, so only the check of the values can find it out
    tensors = safetensors.torch.load(encoded.payload)
    name = next(n for n, x in tensors.items() if x.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    forged = safetensors.torch.save(tensors)
    manifest = encoded.manifest.replace(sha256=hashlib.sha256(forged).hexdigest())
    with pytest.raises(CentralRefused) as refused:
        a.put_update("exp1", 0, forged, manifest.to_json(), check=False)
    assert refused.value.code == "rejected" and "NaN" in str(refused.value)
    assert local_store.list(exp_store.layout.updates_prefix(0)) == []  # neither payload nor record

    a.put_update("exp1", 0, encoded.payload, encoded.manifest.to_json())
    check = local_store.get_json(arrival_key(exp_store, 0, "site-a"))
    assert (check["sha256"], check["size"]) == (encoded.manifest.sha256, len(encoded.payload))
    assert check["delta_norm"] > 0  # what norm clipping uses when the step is decided


def test_the_manifest_is_the_commit_marker_and_is_never_replaced(local_store: LocalFolderStore) -> None:
    exp_store = start(local_store)
    exp_store.commit_update_manifest(0, "site-a", {"site": "site-a"})
    with pytest.raises(ObjectExistsError, match="already uploaded"):
        exp_store.commit_update_manifest(0, "site-a", {"site": "site-a", "n_samples": 9})
    assert exp_store.update_committed(0, "site-a") and not exp_store.update_committed(0, "site-b")


def test_refusals_come_before_the_body_is_read(local_store: LocalFolderStore, serve) -> None:
    central = serve(local_store)
    start(local_store)
    body_read = []

    def body():
        body_read.append(True)
        yield b"--B\r\n"

    headers = {**central.headers("site-a"), "Content-Type": "multipart/form-data; boundary=B"}
    for path, code in (
        ("/v1/experiments/exp1/rounds/1/update", "wrong_round"),
        ("/v1/experiments/nope/rounds/0/update", "unknown_experiment"),
    ):
        answer = requests.put(central.url + path, data=body(), headers=headers, timeout=10)
        assert answer.json()["code"] == code
    outsider = {**central.headers("site-x"), "Content-Type": "multipart/form-data; boundary=B"}
    answer = requests.put(central.url + UPDATE_PATH, data=b"x" * 10, headers=outsider, timeout=10)
    assert answer.json()["code"] == "not_selected"


def test_the_limit_follows_the_model_size(local_store: LocalFolderStore) -> None:
    exp_store = start(local_store)
    manifest = UpdateManifest.from_dict(exp_store.load_global(0)[1])
    size = model_bytes(manifest)
    limits = limits_for(manifest, 2.0, 2 * 1024**3)
    assert 2 * size < limits.payload_bytes < 2 * size + 2 * 1024**2
    assert limits_for(manifest, 2.0, 1000).payload_bytes == 1000


_SERVER = """
import sys
from jipfed.central.app import create_app
from jipfed.central.serve import serve_in_thread
from jipfed.storage.local import LocalFolderStore
store = LocalFolderStore(sys.argv[1])
url, stop = serve_in_thread(create_app(lambda: store, sys.argv[2]))
print(url, flush=True)
sys.stdin.read()
stop()
"""


def _high_water_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_server_memory_stays_bounded_during_a_huge_upload(
    local_store: LocalFolderStore, secret: str, tmp_path: Path
) -> None:
    """The peak RSS of the serving process, not a timing: 128 MiB sent, the peak grows far less."""
    start(local_store)
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(local_store.root), secret],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = server.stdout.readline().strip()
        central = Central(url, local_store, secret)
        central.client("site-a").pending_work()  # warm: the first request builds everything
        before = _high_water_kib(server.pid)
        sent = 0

        def chunked():
            nonlocal sent
            yield b'--B\r\nContent-Disposition: form-data; name="manifest"\r\n\r\n{}\r\n'
            yield b'--B\r\nContent-Disposition: form-data; name="payload"; filename="u"\r\n\r\n'
            for _ in range(128 * 16):  # 128 MiB
                sent += 65536
                yield b"\0" * 65536
            yield b"\r\n--B--\r\n"

        headers = {**central.headers("site-a"), "Content-Type": "multipart/form-data; boundary=B"}
        try:
            answer = requests.put(url + UPDATE_PATH, data=chunked(), headers=headers, timeout=60)
            assert (answer.status_code, answer.json()["code"]) == (413, "too_large")
        except requests.ConnectionError:
            pass  # the server may close the connection once it answered 413
        with pytest.raises(CentralError) as declared:  # Content-Length over the limit: not read at all
            central.client("site-a").put_update("exp1", 0, b"\0" * 64 * 1024**2, "{}", check=False)
        assert declared.value.code == "too_large"
        growth_mib = (_high_water_kib(server.pid) - before) / 1024
        print(json.dumps({"upload_sent_mib": sent / 1024**2, "server_peak_growth_mib": round(growth_mib, 1)}))
        assert growth_mib < 32, f"the server's peak memory grew by {growth_mib:.0f} MiB"
        assert local_store.list("experiments/exp1/rounds/0/updates/") == []
    finally:
        server.stdin.close()
        server.wait(timeout=30)
