"""``jipfed demo``: a federated experiment run by Airflow over three synthetic hospitals.

What runs (all on 127.0.0.1, everything under ``--workdir``):

1. a synthetic BraTS-like data set, one Orthanc PACS per site holding that site's DICOM;
2. ``airflow standalone`` with the central DAG, the JIP Federated plugin (the central endpoint)
   and each site's DAGs, every site with its own identity, PACS Connection and token;
3. the central DAG triggered through the REST API with a small config; each central run is one
   round: it dispatches the round, the sites fetch/convert/preprocess (cached after round 1), train
   a tiny U-Net and upload their update, the central aggregates and starts the next round.

A progress bar follows the rounds; at the end a table of per-round Dice and the plot's path.
Running it again with the same settings finds the experiment finished and prints its table; use
``--experiment`` to start another one.
"""

from __future__ import annotations

import argparse
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from jipfed.commands.arguments import positive_int
from jipfed.federation.experiment import DISPATCH_TRANSPORTS
from jipfed.storage.state import ExperimentStore, Status

logger = logging.getLogger(__name__)

#: The demo's experiment settings (the central DAG's Params), small enough for 2 CPUs.
DEMO_PARAMS: dict[str, Any] = {
    "model_size": "tiny",
    "local_epochs": 2,
    "learning_rate": 0.003,
    "batch_size": 2,
    "round_timeout_s": 900,
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help=__doc__.splitlines()[0],
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", type=Path, default=Path("demo-output"), help="default %(default)s")
    parser.add_argument("--sites", type=positive_int, default=3, help="number of sites (default %(default)s)")
    parser.add_argument("--cases", type=positive_int, default=6, help="cases per site (default %(default)s)")
    parser.add_argument(
        "--rounds", type=positive_int, default=6, help="federated rounds (default %(default)s)"
    )
    parser.add_argument("--strategy", default="fedavg", help="server strategy (default %(default)s)")
    parser.add_argument(
        "--transport",
        choices=DISPATCH_TRANSPORTS,
        default="pull",
        help="how sites get work (default %(default)s)",
    )
    parser.add_argument("--experiment", default=None, help="experiment name (default from the settings)")
    parser.add_argument("--seed", type=int, default=0, help="data and model seed (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """0 when the experiment finished, 1 when it failed."""
    from tqdm import tqdm

    from jipfed.localfed import LocalFederation

    name = args.experiment or f"demo-{args.strategy}-r{args.rounds}-{args.transport}-s{args.seed}"
    params = {
        **DEMO_PARAMS,
        "experiment": name,
        "rounds": args.rounds,
        "strategy": args.strategy,
        "transport": args.transport,
        "seed": args.seed,
    }
    fed = LocalFederation(args.workdir, n_sites=args.sites, cases_per_site=args.cases, seed=args.seed)
    fed.progress = not args.no_progress
    print(f"Starting {args.sites} PACS and Airflow under {fed.workdir} ...", flush=True)
    with fed:
        exp_store = fed.experiment_store(name)
        if _status(exp_store) is Status.FINISHED:
            print(f"experiment {name!r} already finished; its results:")
            status = Status.FINISHED
        else:
            fed.enable_sites(args.transport)
            run_id = fed.trigger(params)
            print(f"Triggered jipfed_central ({run_id}) through {fed.airflow.base_url}/api/v2", flush=True)
            print(
                f"Airflow UI: {fed.airflow.base_url} (user admin, password in {fed.airflow.passwords_file})"
            )
            with tqdm(total=args.rounds, desc="rounds", unit="round", disable=args.no_progress) as bar:

                def on_step(step: int, record: dict[str, Any]) -> None:
                    metrics = record.get("metrics", {})
                    bar.set_postfix(
                        dice=f"{metrics.get('val_dice_mean', float('nan')):.3f}",
                        sites=len(record.get("included", [])),
                    )
                    bar.update(1)

                status = fed.wait(name, timeout_s=600 + 600 * args.rounds, on_step=on_step)
    print()
    print(format_rounds(exp_store))
    plot = fed.store_root / "experiments" / name / "report" / "dice.png"
    print(f"\nplot: {plot}\nstore: {fed.store_root / 'experiments' / name}")
    return 0 if status is Status.FINISHED else 1


def _status(exp_store: ExperimentStore) -> Status | None:
    if not exp_store.store.exists(exp_store.layout.state()):
        return None
    return exp_store.load_state().status


def round_seconds(exp_store: ExperimentStore) -> dict[int, float]:
    """Wall time of each round but the last: from its dispatch to the next round's dispatch."""
    starts = {}
    for record in exp_store.load_state().history:
        dispatch = exp_store.load_dispatch(record.round, record.step)
        if dispatch is not None:
            starts[record.round] = datetime.fromisoformat(dispatch["dispatched_at"])
    return {r: (starts[r + 1] - start).total_seconds() for r, start in starts.items() if r + 1 in starts}


def format_rounds(exp_store: ExperimentStore) -> str:
    """Per round: sites included / missing, Dice of the global model received and of the sites' models."""
    seconds = round_seconds(exp_store)
    header = (
        "round",
        "sites",
        "global Dice (received)",
        "site Dice (after training)",
        "train loss",
        "seconds",
        "missing",
    )
    rows = [header]
    for record in exp_store.load_state().history:
        aggregate = (
            exp_store.load_aggregate(record.round)
            if exp_store.store.exists(exp_store.layout.aggregate(record.round))
            else None
        )
        if aggregate is None:
            continue
        metrics = aggregate["metrics"]
        rows.append(
            (
                str(record.round),
                f"{len(aggregate['included'])}/{len(aggregate['selected'])}",
                _num(metrics.get("global_val_dice_mean")),
                _num(metrics.get("val_dice_mean")),
                _num(metrics.get("train_loss")),
                _num(seconds.get(record.round), 1),
                "; ".join(f"{s}: {r}" for s, r in aggregate.get("missing_reasons", {}).items()) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
