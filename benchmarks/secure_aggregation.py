"""Secure aggregation over the wire: seconds and bytes per round, secure vs plain, through the product's code path.

Each measured round is one step of a fresh experiment (tiny U-Net, FedAvg, ``--sites`` sites) on a
local-folder model store served by the real central endpoint on a loopback port. Every site (a
thread, as a site's upload task would run) takes its work with ``CentralClient``, downloads the
global model, trains one local epoch on its synthetic cases (``run_site_step``; ``--no-train``: a
random delta instead, to isolate the protocol) and then

* **plain**: reports its cohort and uploads the fp32 update (``jipfed.tasks.site_model.upload_update``);
* **secure**: posts its X25519 key, waits for the peers' keys, masks and uploads the masked uint64
  vector (``jipfed.privacy.secagg_site.secure_upload``, product poll interval).

The central then checks every site's status (the collect's ``site_status``) and aggregates the step
(``aggregate_step``: unmasking the sum for secure). Round time: dispatch to the stored global model.
Bytes: what the sites sent (payloads, manifests, keys) and received (the model) per round.
Goal (issue 16): secure aggregation adds at most 10 % to the round's wall time with 4 sites.

``--client-dp Z``: the secure mode also runs client-level DP with noise multiplier Z, the noise
split across the sites (each clips and adds its ChaCha20 share before masking,
``jipfed.privacy.secure_dp``); the plain mode stays without DP.

``--airflow``: the round as the product runs it instead: :class:`jipfed.localfed.LocalFederation`
(``airflow standalone`` with the central DAG, the plugin endpoint and ``--sites`` sites' DAGs, one
Orthanc per site), experiments started from the form with the same training (the orchestration
benchmark's settings, norm bound off in both modes) and secure aggregation off / on, alternating
``--repeats`` times; round wall time from one step's dispatch to the next (the last round: to the
end of its close task), read with ``benchmarks/orchestration.py``'s harness. Everything a round
does counts: the sites' data preparation, training, the uploads, the collect, the aggregation.

Run: ``nice -n 10 .venv/bin/python benchmarks/secure_aggregation.py`` (``--rounds``, ``--sites``,
``--no-train``, ``--client-dp``, ``--airflow [--transport pull|push] [--repeats N]``; results also in
``<workdir>/secure_aggregation.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from jipfed.central.app import create_app
from jipfed.central.client import CentralClient
from jipfed.central.serve import serve_in_thread
from jipfed.central.tokens import site_token
from jipfed.federation.closing import aggregate_step
from jipfed.federation.codec import EncodedUpdate, encode_update
from jipfed.federation.dispatch import DELIVERED, WorkItem, dispatch_step, site_status
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.rounds import start_experiment
from jipfed.federation.site_round import run_site_step
from jipfed.federation.update import ModelUpdate
from jipfed.privacy import secagg_site
from jipfed.privacy.secagg_wire import secure_settings
from jipfed.privacy.secure_dp import noise_share
from jipfed.simulation import prepare_synthetic_sites
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore
from jipfed.tasks.site_model import upload_update
from jipfed.training.config import TrainConfig
from jipfed.training.data import SiteData
from jipfed.training.local import LocalTrainer

GOAL_EXTRA = 0.10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument(
        "--rounds", type=int, default=3, help="measured rounds per mode (after one warm-up each)"
    )
    parser.add_argument("--cases", type=int, default=6, help="synthetic cases per site")
    parser.add_argument("--no-train", action="store_true", help="random deltas instead of local training")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument(
        "--client-dp",
        type=float,
        default=None,
        metavar="Z",
        help="secure mode: client DP, noise multiplier Z",
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "jipfed-secagg-bench")
    parser.add_argument(
        "--airflow", action="store_true", help="real rounds through Airflow (module docstring)"
    )
    parser.add_argument(
        "--transport", choices=("pull", "push"), default="pull", help="--airflow: the transport"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="--airflow: experiments per mode (plain and secure alternate)"
    )
    return parser.parse_args(argv)


def train_config() -> TrainConfig:
    return TrainConfig(size="tiny", epochs=ARGS.epochs, batch_size=2, lr=0.01, amp=False, val_fraction=0.25)


class Round:
    """One step of a fresh experiment through the endpoint; ``run()`` -> (seconds, bytes up, bytes down)."""

    def __init__(self, root: Path, name: str, secure: bool, data: dict[str, SiteData] | None) -> None:
        self.store = LocalFolderStore(root / name)
        self.exp_store = ExperimentStore(self.store, name)
        self.sites = tuple(sorted(data)) if data else ()
        self.data = data
        privacy: dict[str, Any] = {"secure_aggregation": {}} if secure else {}
        if secure and ARGS.client_dp is not None:
            privacy["client_dp"] = {"epsilon": None, "noise_multiplier": ARGS.client_dp}
        config = ExperimentConfig(
            name=name, sites=self.sites, rounds=1, train=train_config(), round_timeout_s=600.0,
            norm_bound_factor=None, privacy=privacy,
        )  # fmt: skip
        start_experiment(self.exp_store, config)
        self.secure = secure
        self.up = self.down = 0
        self._lock = threading.Lock()
        self.errors: list[str] = []

    def count(self, up: int = 0, down: int = 0) -> None:
        with self._lock:
            self.up += up
            self.down += down

    def update(self, client: CentralClient, site: str, item: WorkItem) -> EncodedUpdate:
        ticket = item.ticket
        payload, manifest = client.get_model(ticket.experiment, ticket.round, ticket.step)
        self.count(down=len(payload) + len(json.dumps(manifest)))
        trainer = LocalTrainer(train_config(), self.data[site], device="cpu")
        if not ARGS.no_train:
            return run_site_step(
                ticket,
                payload,
                manifest,
                trainer,
                site,
                ticket.experiment,
                ticket.config_hash,
                evaluate=False,
            )
        start = {n: t for n, t in trainer.get_weights().items() if n in trainer.shared_names}
        delta = {
            n: 0.01 * torch.randn_like(t) if t.is_floating_point() else torch.zeros_like(t)
            for n, t in start.items()
        }
        return encode_update(
            ModelUpdate.build(
                delta, experiment=ticket.experiment, round=0, site=site, kind="delta", n_samples=4,
                config_hash=ticket.config_hash,
            ),
            "fp32",
        )  # fmt: skip

    def site(self, client: CentralClient, site: str) -> None:
        torch.set_num_threads(1)
        try:
            item = client.pending_work()[0]
            encoded = self.update(client, site, item)
            ticket = item.ticket
            if not self.secure:
                client.report_cohort(ticket.experiment, ticket.round, ticket.step, len(self.data[site]))
                manifest = encoded.manifest.to_json()
                upload_update(client, ticket, encoded.payload, manifest, where=site)
                self.count(up=len(encoded.payload) + len(manifest))
                return
            settings = secure_settings(self.exp_store)
            noise = noise_share(ExperimentConfig.from_dict(self.exp_store.load_config()))
            update = secagg_site.site_update(encoded.payload, encoded.manifest.to_json(), 10_000, noise)
            sent = _counting(client, self.count)
            secagg_site.secure_upload(
                sent, experiment=ticket.experiment, round=ticket.round, step=ticket.step, site=site,
                config_hash=ticket.config_hash, update=update, settings=settings,
                deadline=item.dispatch.deadline, key_dir=Path(tempfile.mkdtemp(prefix="secagg-keys-")),
            )  # fmt: skip
        except Exception as exc:
            self.errors.append(f"{site}: {type(exc).__name__}: {exc}")

    def run(self, url: str, secret: str) -> tuple[float, int, int]:
        """Dispatch to the stored global model, as the central sees it: the collect's status of every
        site polled every 20 ms (the sites' own wait for the attempt to complete is not counted)."""
        started = time.perf_counter()
        dispatch = dispatch_step(self.exp_store, 0)
        threads = [
            threading.Thread(
                target=self.site, args=(CentralClient(url, site_token(secret, s), timeout_s=120), s)
            )
            for s in self.sites
        ]
        for thread in threads:
            thread.start()
        while not all(site_status(self.exp_store, dispatch, s)[0] == DELIVERED for s in self.sites):
            if self.errors:
                raise RuntimeError(f"sites failed: {self.errors}")
            time.sleep(0.02)
        aggregate_step(self.exp_store, 0)
        seconds = time.perf_counter() - started
        for thread in threads:
            thread.join()
        if self.errors:
            raise RuntimeError(f"sites failed: {self.errors}")
        return seconds, self.up, self.down


class _counting:
    """A ``CentralClient`` wrapper counting the bytes of the secure-aggregation calls."""

    def __init__(self, client: CentralClient, count: Callable[..., None]) -> None:
        self.client, self._count = client, count

    def secagg_status(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        status = self.client.secagg_status(*args, **kwargs)
        self._count(down=len(json.dumps(status)))
        return status

    def post_secagg_key(self, *args: Any) -> dict[str, Any]:
        self._count(up=len(json.dumps({"public_key": args[-1]})))
        return self.client.post_secagg_key(*args)

    def put_masked_update(self, *args: Any) -> dict[str, Any]:
        self._count(up=len(args[-2]) + len(args[-1]))
        return self.client.put_masked_update(*args)


def airflow_rounds() -> tuple[dict[str, list[tuple[float, int, int]]], dict[str, list[float]]]:
    """Per mode, every measured round's (wall seconds, 0, 0) through a real Airflow (``--airflow``)
    and its orchestration overhead (wall - slowest site's training); bytes are not counted there
    (the toy mode counts them)."""
    from orchestration import PARAMS as ORCHESTRATION_PARAMS
    from orchestration import measure

    from jipfed.localfed import LocalFederation

    base = {
        **ORCHESTRATION_PARAMS, "local_epochs": ARGS.epochs, "transport": ARGS.transport,
        "norm_bound_factor": None,
    }  # fmt: skip
    results: dict[str, list[tuple[float, int, int]]] = {"plain": [], "secure": []}
    overheads: dict[str, list[float]] = {"plain": [], "secure": []}
    workdir = Path(tempfile.mkdtemp(prefix="airflow-", dir=ARGS.workdir))
    with LocalFederation(
        workdir, n_sites=ARGS.sites, cases_per_site=ARGS.cases, shape=(48, 48, 32), progress=False
    ) as fed:
        fed.enable_sites(ARGS.transport)
        fed.trigger({**base, "experiment": "warm-up", "rounds": 1})  # the sites' data caches
        fed.wait("warm-up", 900)
        for i in range(ARGS.repeats):
            for mode in ("plain", "secure"):
                name = f"{mode}-{i}"
                fed.trigger(
                    {
                        **base,
                        "experiment": name,
                        "rounds": ARGS.rounds,
                        "secure_aggregation": mode == "secure",
                    }
                )
                fed.wait(name, 900 * ARGS.rounds)
                for row in measure(fed, name, ARGS.transport):
                    results[mode].append((row["wall_s"], 0, 0))
                    overheads[mode].append(row["overhead_s"])
                    print(
                        f"{mode:6s} {name} round {row['round']}: {row['wall_s']:.2f} s "
                        f"(slowest training {row['slowest_train_s']:.2f} s, {row['sites_trained']} sites trained)"
                    )
    return results, overheads


def overhead_summary(overheads: dict[str, list[float]], plain_round_s: float) -> dict[str, Any]:
    """What secure aggregation adds to the orchestration overhead (wall - slowest training: the
    training time follows the machine's load, the overhead much less), as a share of the plain round."""
    plain, secure = (statistics.median(overheads[mode]) for mode in ("plain", "secure"))
    share = (secure - plain) / plain_round_s
    verdict = "PASS" if share <= GOAL_EXTRA else "MISS"
    print(
        f"  overhead (wall - slowest training), median: plain {plain:.2f} s, secure {secure:.2f} s: secure "
        f"aggregation adds {secure - plain:+.2f} s = {100 * share:+.1f} % of the plain round: {verdict}"
    )
    return {"plain_s": plain, "secure_s": secure, "share_of_plain_round": share, "verdict": verdict}


def toy_rounds() -> dict[str, list[tuple[float, int, int]]]:
    """Per mode, every measured round's (seconds, bytes up, bytes down) without Airflow."""
    folders = prepare_synthetic_sites(
        ARGS.workdir / "data", n_sites=ARGS.sites, cases_per_site=ARGS.cases, shape=(32, 32, 20),
        spatial_size=(16, 16, 16), spacing_mm=(4.0, 4.0, 4.0), progress=False,
    )  # fmt: skip
    data = {
        f"site-{i}": SiteData.from_dir(folder, group=f"site-{i}") for i, folder in enumerate(folders.values())
    }
    secret = secrets.token_hex(32)
    root = Path(tempfile.mkdtemp(prefix="stores-", dir=ARGS.workdir))
    stores: dict[str, LocalFolderStore] = {}
    url, stop = serve_in_thread(create_app(lambda: stores["current"], secret))
    results: dict[str, list[tuple[float, int, int]]] = {"plain": [], "secure": []}
    try:
        for i in range(ARGS.rounds + 1):  # round 0 of each mode warms up
            for mode in ("plain", "secure"):
                bench = Round(root, f"{mode}-{i}", mode == "secure", data)
                stores["current"] = bench.store
                measured = bench.run(url, secret)
                if i:
                    results[mode].append(measured)
                print(
                    f"{mode:6s} round {i}: {measured[0]:.2f} s, up {measured[1]:,} B, down {measured[2]:,} B"
                )
    finally:
        stop()
    return results


def main(argv: list[str] | None = None) -> int:
    global ARGS
    ARGS = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if ARGS.airflow and (ARGS.no_train or ARGS.client_dp is not None):
        raise SystemExit("--airflow runs the product's rounds: --no-train and --client-dp do not apply")
    ARGS.workdir.mkdir(parents=True, exist_ok=True)
    overheads = None
    if ARGS.airflow:
        results, overheads = airflow_rounds()
    else:
        results = toy_rounds()
    summary = {
        mode: {
            "seconds_median": statistics.median(r[0] for r in runs),
            "seconds": [round(r[0], 3) for r in runs],
            "bytes_up_per_round": runs[-1][1],
            "bytes_down_per_round": runs[-1][2],
        }
        for mode, runs in results.items()
    }
    extra = summary["secure"]["seconds_median"] / summary["plain"]["seconds_median"] - 1
    verdict = "PASS" if extra <= GOAL_EXTRA else "MISS"
    training = (
        "random deltas (protocol only)" if ARGS.no_train else f"{ARGS.epochs} local epoch(s) of a tiny U-Net"
    )
    if ARGS.airflow:
        training += f", real rounds in Airflow ({ARGS.transport}, {ARGS.repeats} experiments per mode)"
    dp = (
        "" if ARGS.client_dp is None else f", secure with client DP z={ARGS.client_dp:g} (noise at the sites)"
    )
    print(f"\n{ARGS.sites} sites, {training}{dp}, {len(results['plain'])} rounds per mode (median):")
    for mode, s in summary.items():
        sent = (
            ""
            if ARGS.airflow
            else f", sent {s['bytes_up_per_round']:,} B, received {s['bytes_down_per_round']:,} B"
        )
        print(f"  {mode:6s} {s['seconds_median']:.2f} s/round{sent}")
    print(
        f"  secure aggregation adds {100 * extra:+.1f} % to the round's wall time: {verdict} (goal <= 10 %)"
    )
    overhead = overhead_summary(overheads, summary["plain"]["seconds_median"]) if overheads else None
    # the machine's load changes every figure above: say what it was
    print("  load average (1, 5, 15 min) after the rounds: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    out = ARGS.workdir / "secure_aggregation.json"
    out.write_text(
        json.dumps(
            {
                "args": vars(ARGS) | {"workdir": str(ARGS.workdir)},
                **summary,
                "extra": extra,
                "verdict": verdict,
                "overhead": overhead,
            },
            indent=2,
        )
    )
    return 0


ARGS: argparse.Namespace


if __name__ == "__main__":
    raise SystemExit(main())
