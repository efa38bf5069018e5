"""``jipfed simulate``: a whole federated experiment in one process, through the DAGs' protocol functions.

Data: ``--data DIR`` with one sub-folder per site holding preprocessed cases (``index.json`` +
``.npz``, directly or as the site pipeline's ``preprocessed/<hash>/``), or ``--synth`` to build
them first (synthetic DICOM → NIfTI → preprocessed, under ``--out``/data, cached). Results under
``--out``: the model store (``store/``), ``metrics.json``, ``metrics.csv`` and the per-round plot.
Running it again with the same ``--out`` and settings resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from jipfed.commands.arguments import positive_int
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.plans import ORDERS, PLANS
from jipfed.federation.strategies import STRATEGIES
from jipfed.federation.update import ENCODINGS
from jipfed.training.config import SIZES, TrainConfig

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``simulate`` and its options."""
    parser = subparsers.add_parser(
        "simulate",
        help="run a federated experiment in-process (simulation)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", type=Path, help="folder with one sub-folder of preprocessed cases per site")
    data.add_argument(
        "--synth", action="store_true", help="generate synthetic sites through the data pipeline"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (store, metrics, plot)")
    parser.add_argument(
        "--sites", type=positive_int, help="number of sites (--synth: default 3; --data: first N)"
    )
    parser.add_argument(
        "--cases-per-site", type=positive_int, default=8, help="--synth: cases per site on average"
    )
    parser.add_argument(
        "--shape", type=positive_int, nargs=3, default=[64, 64, 40], metavar=("ROWS", "COLS", "SLICES")
    )
    parser.add_argument(
        "--spatial-size",
        type=positive_int,
        nargs=3,
        default=[48, 48, 32],
        metavar=("X", "Y", "Z"),
        help="--synth: preprocessed grid (multiples of 8; default %(default)s)",
    )
    parser.add_argument("--name", default="simulation", help="experiment name (default %(default)s)")
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), default="fedavg")
    parser.add_argument(
        "--strategy-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="strategy keyword argument, VALUE parsed as JSON (repeatable), e.g. eta=0.01",
    )
    parser.add_argument("--plan", choices=sorted(PLANS), default="parallel")
    parser.add_argument("--order", choices=ORDERS, default="fixed", help="cyclic plan: site order")
    parser.add_argument("--proportional-steps", action="store_true", help="cyclic: local steps ~ site size")
    work = parser.add_mutually_exclusive_group()
    work.add_argument("--local-epochs", type=positive_int, help="local epochs per round (default 1)")
    work.add_argument("--local-steps", type=positive_int, help="local optimiser steps per round")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=positive_int, default=2)
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--model", choices=("unet", "segresnet"), default="unet")
    parser.add_argument("--encoding", choices=ENCODINGS, default="fp32")
    parser.add_argument("--min-sites", type=positive_int, help="quorum (default: every site)")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--personalize-epochs",
        type=int,
        default=0,
        metavar="N",
        help="after training, each site fine-tunes the global model for N epochs; prints both scores per site",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)
    return parser


def parse_strategy_args(items: list[str]) -> dict[str, Any]:
    """``["eta=0.01", "tau=1e-3"]`` → ``{"eta": 0.01, "tau": 0.001}`` (values as JSON, else strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--strategy-arg must be KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def find_site_folders(data: Path, n_sites: int | None = None) -> dict[str, Path]:
    """Site id (sub-folder name) → folder with ``index.json`` (itself or its one ``preprocessed/<hash>/``)."""
    if not data.is_dir():
        raise ValueError(f"--data {data} is not a folder")
    found: dict[str, Path] = {}
    for sub in sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (sub / "index.json").is_file():
            found[sub.name] = sub
            continue
        candidates = sorted(p.parent for p in sub.glob("preprocessed/*/index.json"))
        if len(candidates) > 1:
            raise ValueError(f"site folder {sub} holds several preprocessed caches {candidates}; pick one")
        if candidates:
            found[sub.name] = candidates[0]
    if not found:
        raise ValueError(f"no site folders with index.json under {data}")
    if n_sites is not None:
        if n_sites > len(found):
            raise ValueError(f"--sites {n_sites}, but {data} holds only {len(found)} site folder(s)")
        found = dict(list(found.items())[:n_sites])
    return found


def build_config(
    args: argparse.Namespace, sites: list[str], site_samples: dict[str, int]
) -> ExperimentConfig:
    """The experiment config the options describe."""
    train = TrainConfig(
        model=args.model,
        size=args.size,
        epochs=args.local_epochs if args.local_steps is None else None,
        steps=args.local_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        val_fraction=args.val_fraction,
    )
    return ExperimentConfig(
        name=args.name,
        sites=tuple(sites),
        rounds=args.rounds,
        train=train,
        strategy=args.strategy,
        strategy_kwargs=parse_strategy_args(args.strategy_arg),
        plan=args.plan,
        order=args.order,
        proportional_steps=args.proportional_steps,
        site_samples=site_samples if args.proportional_steps else {},
        min_sites=args.min_sites,
        encoding=args.encoding,
        seed=args.seed,
    )


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    """Plain-text table: one line per round, the global value then each site's."""
    sites = sorted({s for row in rows for s in row["sites"]})
    header = ["round", f"global {metric}", *sites]
    lines = [header]
    for row in rows:
        values = [row["global"].get(metric)] + [row["sites"].get(s, {}).get(metric) for s in sites]
        lines.append([str(row["round"]), *("-" if v is None else f"{v:.4f}" for v in values)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)


def run(args: argparse.Namespace) -> int:
    """Run the simulation and print the per-round table; 0 on success, 2 on bad input."""
    from jipfed.simulation import prepare_synthetic_sites, simulate, site_train_sizes
    from jipfed.training.data import SiteData

    try:
        if args.synth:
            folders = prepare_synthetic_sites(
                args.out / "data",
                args.sites or 3,
                args.cases_per_site,
                shape=tuple(args.shape),
                spatial_size=tuple(args.spatial_size),
                seed=args.seed,
                progress=not args.no_progress,
            )
        else:
            folders = find_site_folders(args.data, args.sites)
        sites = {site: SiteData.from_dir(folder, group=site) for site, folder in folders.items()}
        provisional = TrainConfig(val_fraction=args.val_fraction, seed=args.seed)
        config = build_config(args, list(sites), site_train_sizes(sites, provisional))
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    if args.personalize_epochs < 0:
        logger.error("--personalize-epochs must be >= 0, got %d", args.personalize_epochs)
        return 2
    result = simulate(
        sites, config, args.out, progress=not args.no_progress, personalize_epochs=args.personalize_epochs
    )
    print(format_table(list(result.rows), result.metric))
    for site, scores in result.personalised.items():
        print(
            f"site {site}: global {result.metric} {scores['global'][result.metric]:.4f}, "
            f"personalised {scores['personalised'][result.metric]:.4f}"
        )
    print(f"\nmetrics: {result.metrics_json}\n         {result.metrics_csv}\nplot:    {result.plot}")
    print(
        f"final model: {args.out / 'store' / 'experiments' / config.name / 'final'}  ({result.seconds:.0f} s)"
    )
    return 0
