"""End to end at the endpoint: every byte sites send during a run holds none of their patients' identifiers.

A recording ASGI wrapper keeps every request line, header (but the bearer token) and body the
central receives while real sites work through a round with the real ``CentralClient``: site-a
trains on cases whose keys, folder and file names are patient identifiers and uploads its
signed update; site-b's fetch fails with an exception text full of identifiers and it reports
the failure; site-c reports its cohort and trains too. The scan looks for names, ids, DICOM UIDs
and file paths in all of it.

Not covered here: the site DAG's operators and ``jipfed/tasks`` (they build the same client; the
sanitiser and the outgoing guard live in the client, so every caller passes through them).
"""

from __future__ import annotations

from pathlib import Path

import torch
from central.helpers import TRAIN, start
from training.synth import write_site

from jipfed.central.app import create_app
from jipfed.central.client import CentralClient
from jipfed.central.credentials import issue_credential
from jipfed.central.serve import serve_in_thread
from jipfed.federation.rounds import aggregate_step
from jipfed.federation.signing import generate_private_key, public_key_raw
from jipfed.federation.site_round import run_site_step
from jipfed.storage.local import LocalFolderStore
from jipfed.testing.recording import Recorder
from jipfed.training.data import SiteData
from jipfed.training.local import LocalTrainer

PATIENT = "Mustermann^Max"
PATIENT_ID = "PAT0012345"
SERIES_UID = "1.2.826.0.1.3680043.8.498.10957"


def test_nothing_a_site_sends_identifies_a_patient(tmp_path: Path, secret: str) -> None:
    torch.set_num_threads(1)
    store = LocalFolderStore(tmp_path / "central")
    recorder = Recorder(create_app(lambda: store, secret))
    url, stop = serve_in_thread(recorder)
    try:
        exp_store = start(store)
        keys = {site: generate_private_key() for site in ("site-a", "site-b", "site-c")}
        clients = {}
        for site, key in keys.items():
            token, _ = issue_credential(store, secret, site, public_key=public_key_raw(key))
            clients[site] = CentralClient(url, token, timeout_s=30, signing_key=key)
        site_dirs = {
            site: write_site(
                tmp_path / f"{site}-{PATIENT_ID}-Mustermann_Max", 4, seed=i, size=16, prefix=PATIENT_ID
            )
            for i, site in enumerate(("site-a", "site-c"))
        }
        case_keys = [p.stem for d in site_dirs.values() for p in d.glob("*.npz")]
        assert case_keys and all(key.startswith(PATIENT_ID) for key in case_keys)

        for site in ("site-a", "site-c"):
            client = clients[site]
            [item] = client.pending_work()
            ticket = item.ticket
            data = SiteData.from_dir(site_dirs[site], group=site)
            client.report_cohort(ticket.experiment, ticket.round, ticket.step, len(data))
            payload, manifest = client.get_model(ticket.experiment, ticket.round, ticket.step)
            trainer = LocalTrainer(TRAIN, data, device="cpu")
            encoded = run_site_step(
                ticket, payload, manifest, trainer, site, ticket.experiment, ticket.config_hash, evaluate=True
            )
            client.put_update(
                ticket.experiment, ticket.round, encoded.payload, encoded.manifest.to_json(), step=0
            )

        fetch_error = (
            f'Traceback (most recent call last):\n  File "{tmp_path}/site-b/fetch.py", line 9\n'
            f"RuntimeError: C-MOVE of series {SERIES_UID} for patient '{PATIENT}' ({PATIENT_ID}) from "
            f"http://pacs.site-b.internal:8042/dicom-web failed; partial files in {tmp_path}/site-b/{PATIENT_ID}/"
        )
        [item_b] = clients["site-b"].pending_work()
        clients["site-b"].report_failure("exp1", 0, item_b.ticket.step, fetch_error, task="fetch_dicom")
        aggregate_step(exp_store, 0)
    finally:
        stop()

    sent = b"\n".join(recorder.received)
    assert len(recorder.received) > 20 and len(sent) > 100_000  # the updates themselves are in there
    forbidden = [PATIENT, "Mustermann", "Max", PATIENT_ID, SERIES_UID, "pacs.site-b.internal", str(tmp_path)]
    forbidden += (
        case_keys
        + [str(d) for d in site_dirs.values()]
        + [p.name for d in site_dirs.values() for p in d.iterdir()]
    )
    found = sorted({word for word in forbidden if word.encode() in sent})
    assert found == [], f"identifying bytes left the sites: {found}"
    assert exp_store.load_aggregate(0)["missing_reasons"]["site-b"].startswith(
        "data in fetch_dicom: RuntimeError"
    )
