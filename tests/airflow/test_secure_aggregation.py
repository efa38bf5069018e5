"""Secure aggregation end to end in real Airflow 3.3: one site stops after key agreement, the round is
retried without it and completes.

The central DAG runs in ``dag.test()`` (Airflow 3.3, a subprocess) against a local-folder model store;
the central endpoint serves the same store on a loopback port. Three sites take the step through the
endpoint with the product's client: two train a tiny U-Net (``run_site_step``) and run the site's
upload task (``jipfed.tasks.site_model.upload``: key, wait for the peers' keys, mask, upload, re-mask
on a retry); the third takes the work, posts its key and then never uploads (a site whose process
died). The global model must equal the plain weighted mean of the two remaining updates within the
fixed-point error, and the store must hold no unmasked site update.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_torch

from jipfed.central.app import create_app
from jipfed.central.client import CentralClient
from jipfed.central.serve import serve_in_thread
from jipfed.central.tokens import site_token
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.rounds import start_experiment
from jipfed.federation.site_round import run_site_step
from jipfed.privacy import secagg
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore
from jipfed.tasks import site_model
from jipfed.tasks.identity import SiteIdentity
from jipfed.tasks.run import SiteRun
from jipfed.testing.airflow import run_dag_test
from jipfed.training.config import TrainConfig
from jipfed.training.data import SiteData
from jipfed.training.local import LocalTrainer
from tests.airflow.secure_helpers import assert_only_masked_updates, assert_secure_round
from tests.training.synth import write_site

REPO = Path(__file__).resolve().parents[2]
DAG_FILE = REPO / "dags" / "jipfed_central.py"
SITES = ("site-a", "site-b", "site-c")
DEAD = "site-c"
NAME = "secagg-dropout"
TRAIN = TrainConfig(size="tiny", steps=1, batch_size=2, lr=0.01, amp=False, augment=False)


class Sites:
    """The three sites, in a thread: each polls its work through the endpoint and answers it once."""

    def __init__(self, url: str, secret: str, data: dict[str, Path], root: Path) -> None:
        self.clients = {
            s: CentralClient(url, site_token(secret, s), timeout_s=30, backoff_s=0.05) for s in SITES
        }
        self.data, self.root = data, root
        self.updates: dict[str, dict[str, torch.Tensor]] = {}
        self.weights: dict[str, int] = {}
        self.results: dict[str, Any] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._site, args=(s,), daemon=True) for s in SITES]

    def __enter__(self) -> Sites:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _site(self, site: str) -> None:
        torch.set_num_threads(1)
        client = self.clients[site]
        try:
            while not self._stop.is_set():
                work = client.pending_work_dicts()
                if work:
                    self.results[site] = self._answer(site, client, work[0])
                    return
                self._stop.wait(0.3)
        except Exception as exc:  # the test asserts the list is empty
            self.errors.append(f"{site}: {type(exc).__name__}: {exc}")

    def _answer(self, site: str, client: CentralClient, item: dict[str, Any]) -> Any:
        ticket = item["ticket"]
        if site == DEAD:  # takes the work, agrees a key, dies
            key = base64.b64encode(secagg.public_bytes(secagg.new_private_key())).decode()
            return client.post_secagg_key(ticket["experiment"], ticket["round"], ticket["step"], 0, key)
        run_dir = self.root / site / "run"
        run = SiteRun(
            SiteIdentity(site_id=site, data_root=self.root / site),
            run_dir,
            run_dir / "train",
            run_dir / "upload",
            item,
        )
        run.in_dir.mkdir(parents=True)
        run.out_dir.mkdir(parents=True)
        work = run.require_work()
        payload, manifest = client.get_model(work.ticket.experiment, work.ticket.round, work.ticket.step)
        trainer = LocalTrainer(TRAIN, SiteData.from_dir(self.data[site], group=site), device="cpu")
        encoded = run_site_step(
            work.ticket, payload, manifest, trainer, site, work.ticket.experiment, work.ticket.config_hash
        )
        (run.in_dir / site_model.UPDATE_PAYLOAD).write_bytes(encoded.payload)
        (run.in_dir / site_model.UPDATE_MANIFEST).write_text(encoded.manifest.to_json())
        (run.in_dir / site_model.TRAINED_CASES).write_text(json.dumps({"n_cases": 4}))
        self.updates[site] = load_torch(encoded.payload)
        self.weights[site] = encoded.manifest.n_samples
        return site_model.upload(run, client)  # the site DAG's upload task


@pytest.mark.slow
def test_a_site_dropping_after_key_agreement_is_retried_without_it(tmp_path: Path) -> None:
    store_root = tmp_path / "store"
    store = LocalFolderStore(store_root)
    exp_store = ExperimentStore(store, NAME)
    config = ExperimentConfig(
        name=NAME,
        sites=SITES,
        rounds=1,
        train=TRAIN,
        round_timeout_s=240.0,
        min_sites=2,
        transport="pull",
        norm_bound_factor=None,
        privacy={"secure_aggregation": {"upload_timeout_s": 20.0}},
    )
    start_experiment(exp_store, config)
    start_global = load_torch(store.get_bytes(exp_store.layout.global_model(0)))
    data = {
        s: write_site(tmp_path / "data" / s, 4, seed=i, size=16, prefix=str(i)) for i, s in enumerate(SITES)
    }
    dags = tmp_path / "dags"
    dags.mkdir()
    shutil.copy(DAG_FILE, dags / DAG_FILE.name)
    env = {
        "AIRFLOW_CONN_JIPFED_MODEL_STORE_DEFAULT": json.dumps(
            {"conn_type": "fs", "extra": {"path": str(store_root)}}
        ),
        "JIPFED_POLL_INTERVAL_S": "1",
    }
    secret = secrets.token_hex(32)
    url, stop = serve_in_thread(create_app(lambda: store, secret))
    try:
        with Sites(url, secret, data, tmp_path / "sites") as sites:
            run = run_dag_test(
                sys.executable,
                dags,
                "jipfed_central",
                home=tmp_path / "af3-home",
                run_conf={"experiment": NAME, "step": 0},
                env=env,
                timeout_s=300,
            )
    finally:
        stop()
    assert sites.errors == []
    assert run["state"] == "success", run
    for site in ("site-a", "site-b"):
        assert sites.results[site]["complete"] and sites.results[site]["attempt"] == 1

    assert_secure_round(
        exp_store, 0, ["site-a", "site-b"], {DEAD: "posted its key but sent no masked update"}
    )

    new_global = load_torch(store.get_bytes(exp_store.layout.global_model(1)))
    wa, wb = sites.weights["site-a"], sites.weights["site-b"]
    ua, ub = sites.updates["site-a"], sites.updates["site-b"]
    for name, tensor in start_global.items():
        if not tensor.is_floating_point():
            continue
        mean = (wa * ua[name].double() + wb * ub[name].double()) / (wa + wb)
        # fixed point: at most n/2 * 2^-24 / total weight per element, plus float32 rounding
        assert torch.allclose(new_global[name].double(), tensor.double() + mean, atol=1e-6), name
    assert_only_masked_updates(exp_store, 0, masked=4)  # a and b in attempts 0 and 1
