"""What leaves a site: sanitised failure reports, and only expected tensors and numbers in an update."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch

from jipfed.central.client import CentralClient, OutgoingRefused
from jipfed.central.outgoing import OutgoingRejected, check_outgoing_update
from jipfed.central.sanitize import category_of, failure_report, sanitize_text
from jipfed.federation.codec import encode_update
from jipfed.federation.update import ModelUpdate

#: What a site's exception texts may contain: none of it may leave.
IDENTIFYING = (
    "1.2.826.0.1.3680043.8.498.10957239583927",
    "Max Mustermann",
    "MUSTERMANN^MAX",
    "PAT-0012345",
    "0012345",
    "/data/site-a/runs/4711/Mustermann_Max/t1.nii.gz",
    "http://pacs.klinikum.internal:8042/dicom-web",
    "pacs.klinikum.internal",
    "max.mustermann@klinikum.de",
    "1970-01-02",
    "Müller",
)


def test_failure_reports_keep_category_task_and_words_but_no_identifier() -> None:
    text = (
        'Traceback (most recent call last):\n  File "/opt/jipfed/tasks/fetch.py", line 3\n'
        "RuntimeError: fetch failed for series 1.2.826.0.1.3680043.8.498.10957239583927 of patient "
        "'Max Mustermann' (PAT-0012345, MUSTERMANN^MAX, born 1970-01-02, Müller) from "
        "http://pacs.klinikum.internal:8042/dicom-web into /data/site-a/runs/4711/Mustermann_Max/t1.nii.gz; "
        "mail max.mustermann@klinikum.de, id 0012345, host pacs.klinikum.internal:8042"
    )
    report = failure_report(text, task="fetch_dicom")
    assert report.startswith("data in fetch_dicom: RuntimeError: fetch failed for series <uid>")
    for secret in IDENTIFYING:
        assert secret not in report and secret.lower() not in report.lower()
    assert len(failure_report("x" * 10_000)) < 300
    assert category_of("ConnectionError: refused") == "connection"
    assert category_of("CUDA out of memory") == "resources"
    assert sanitize_text("") == "no message"


def _encoded(metrics: dict | None = None):
    update = ModelUpdate.build(
        {"w": torch.ones(3)},
        experiment="e",
        round=0,
        site="site-a",
        kind="delta",
        n_samples=2,
        config_hash="0" * 64,
        metrics=metrics or {"loss": 0.5},
    )
    return encode_update(update)


def _with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_the_outgoing_guard_passes_a_plain_update_and_refuses_extras() -> None:
    good = _encoded()
    check_outgoing_update(good.payload, good.manifest.to_json(), "site-a")
    with pytest.raises(OutgoingRejected, match="names site 'site-a', this client is 'site-b'"):
        check_outgoing_update(good.payload, good.manifest.to_json(), "site-b")
    named = _encoded({"Max Mustermann 0012345": 1.0})
    with pytest.raises(OutgoingRejected, match="metric name") as metric:
        check_outgoing_update(named.payload, named.manifest.to_json())
    assert "Mustermann" not in str(metric.value)
    entry = {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}
    data = torch.ones(3).numpy().tobytes()
    for header, match in (
        ({"__metadata__": {"patient": "Max Mustermann"}, "w": entry}, "__metadata__"),
        ({"w": entry, "extra": {"dtype": "F32", "shape": [0], "data_offsets": [12, 12]}}, "does not list"),
    ):
        payload = _with_header(header, data)
        manifest = good.manifest.replace(sha256=hashlib.sha256(payload).hexdigest())
        with pytest.raises(OutgoingRejected, match=match):
            check_outgoing_update(payload, manifest.to_json())
    with pytest.raises(OutgoingRejected, match="not a safetensors"):
        check_outgoing_update(b"\x80\x04pickle", good.manifest.to_json())
    with pytest.raises(OutgoingRejected, match="sha256"):
        check_outgoing_update(good.payload + b" ", good.manifest.to_json())


def test_the_client_refuses_to_send_what_the_guard_refuses() -> None:
    named = _encoded({"Max Mustermann 0012345": 1.0})
    client = CentralClient("http://127.0.0.1:9", "jipfed.site-a." + "0" * 64, tries=1)
    with pytest.raises(OutgoingRefused) as refused:  # port 9 is never contacted
        client.put_update("e", 0, named.payload, named.manifest.to_json())
    assert refused.value.code == "rejected" and refused.value.status_code is None
