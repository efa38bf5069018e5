"""Federated vs centralised training across a heterogeneity grid, at equal total epochs, on a test split.

Data: ``jipfed.imaging.synth`` profiles (:func:`~jipfed.imaging.synth.profiles.heterogeneity_profiles`)
→ ``convert`` → ``preprocess``, built once per setting and seed under ``--workdir`` and reused:

- ``homogeneous``: 3 identical sites;
- ``default``: the 3 heterogeneous default sites (unequal sizes and scanners);
- ``strong``: 4 sites, sizes 8 : 2 : 1.5 : 1, field strengths 3 / 1.5 T, four orientations,
  intensity scales 500 - 3200, different bias / noise / spacing, HGG shares 0.2 - 0.85.

Each site's cases are split into a **test** split (``--test-fraction``, never used to choose
anything) and the rest, which the simulator splits again into training and **validation** cases
(``--val-fraction``): per-round curves, rounds to 95 % and the choice of the best method use the
validation cases; every ratio and per-site Dice printed is on the test cases.

Every run trains the same tiny U-Net from the same seeded initial weights for ``--epochs`` passes
over the union of the training cases: ``central`` (pooled cases, one optimiser), each federated
method through ``jipfed.simulation.simulate`` (the protocol functions the Airflow DAGs call;
``R = epochs / local-epochs`` rounds), and ``solo`` (each site alone, same epochs over its own
cases). All methods run at their registry defaults (no per-setting tuning) unless ``--kwargs``
says otherwise.

Printed per setting: every method's test Dice averaged over seeds, its ratio to the centralised
test Dice, rounds to 95 % of the centralised validation Dice; for the best method (chosen on
validation) the per-site test Dice against the centralised model's and each site's solo score.
Then PASS / MISS lines for issue 12's goals on the strong setting:

1. the best federated method reaches >= 99 % of the centralised test Dice;
2. a FedAvg-family method at its defaults (fedavg, fedavgm, fednova; best on validation) >= 97 %;
3. no site's test Dice under the best method is more than 5 % below the centralised model's there.

Run: ``nice -n 5 .venv/bin/python benchmarks/fl_vs_central.py > /tmp/fl.log 2>&1 &`` (default grid;
measured on a shared, loaded 2-core machine: the strong setting's 3 seeds as three parallel
``--seeds N`` processes 6.9 min, homogeneous + default 2.0 min, data preparation a few minutes per
setting and seed); ``--quick`` for a smoke run of a few minutes. Finished runs are cached
in ``--workdir`` by their settings. Results: ``<workdir>/results<tag>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from jipfed import reporting
from jipfed.federation.experiment import ExperimentConfig
from jipfed.imaging.synth.profiles import HETEROGENEITY_SETTINGS, heterogeneity_profiles
from jipfed.simulation import prepare_synthetic_sites, simulate, train_centralized
from jipfed.training.config import SIZES, TrainConfig
from jipfed.training.data import SiteData
from jipfed.training.local import LocalTrainer

RATIO_GOAL = 0.99
DEFAULT_GOAL = 0.97
SITE_GOAL = 0.95
SPEED_TARGET = 0.95
FEDAVG_FAMILY = ("fedavg", "fedavgm", "fednova")
METHODS = ("fedavg", "fedprox", "fedavgm", "fednova", "fedadam", "scaffold", "feddyn", "cyclic")
DEFAULT_METHODS = ("fedavg", "fednova", "fedadam", "scaffold", "feddyn")
METRIC = "dice_mean"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jipfed-fl-vs-central"))
    parser.add_argument(
        "--settings", nargs="+", choices=HETEROGENEITY_SETTINGS, default=list(HETEROGENEITY_SETTINGS)
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the strong setting")
    parser.add_argument("--other-seeds", type=int, nargs="+", default=[0], help="seeds of the other settings")
    parser.add_argument("--smallest", type=int, default=3, help="cases of the smallest strong site")
    parser.add_argument(
        "--shape", type=int, nargs=3, default=[48, 48, 32], metavar=("ROWS", "COLS", "SLICES")
    )
    parser.add_argument("--spatial-size", type=int, nargs=3, default=[24, 24, 24], metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, default=[4.0, 4.0, 4.0], metavar=("X", "Y", "Z"))
    parser.add_argument("--size", choices=SIZES, default="tiny", help="U-Net preset (default %(default)s)")
    parser.add_argument(
        "--epochs", type=int, default=40, help="total epochs of every run (default %(default)s)"
    )
    parser.add_argument("--local-epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=3e-3, help="site / central Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    parser.add_argument(
        "--other-methods",
        nargs="+",
        choices=METHODS,
        default=["fedavg", "fedadam", "scaffold"],
        help="methods of the homogeneous and default settings",
    )
    parser.add_argument(
        "--kwargs",
        action="append",
        default=[],
        metavar="METHOD=JSON",
        help="strategy keyword arguments of one method, e.g. fedadam='{\"eta\": 0.02}' (repeatable)",
    )
    parser.add_argument("--tag", default="", help="suffix of the result file")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest for the tiny U-Net)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: strong setting, 1 seed, 16^3, 4 epochs"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.settings, args.seeds, args.smallest = ["strong"], [0], 3
        args.shape, args.spatial_size, args.spacing = [32, 32, 24], [16, 16, 16], [8.0, 8.0, 8.0]
        args.epochs, args.local_epochs = 4, 1
        args.workdir = args.workdir.with_name(args.workdir.name + "-quick")
    if args.epochs % args.local_epochs:
        parser.error(f"--epochs {args.epochs} must be a multiple of --local-epochs {args.local_epochs}")
    try:
        args.method_kwargs = {m: json.loads(v) for m, _, v in (k.partition("=") for k in args.kwargs)}
    except json.JSONDecodeError as exc:
        parser.error(f"--kwargs: {exc}")
    return args


def short_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]


def split_test(sites: Mapping[str, SiteData], fraction: float, seed: int) -> tuple[dict, dict]:
    """(site → cases left for training / validation, site → test cases) per site."""
    rest, test = {}, {}
    for site, data in sites.items():
        keep, held = data.split(fraction, seed + 7919)  # another ranking than the validation split
        rest[site], test[site] = SiteData(tuple(keep)), SiteData(tuple(held))
    return rest, test


def experiment(
    args: argparse.Namespace, method: str, sites: list[str], train: TrainConfig, seed: int
) -> ExperimentConfig:
    """One federated method's config, named ``<method>-<hash of the benchmark's settings>``.

    The hash covers what this benchmark chooses (method, its keyword arguments, rounds, training
    config, seed, sites), so a finished run stays cached when unrelated experiment fields change.
    """
    rounds = args.epochs // args.local_epochs
    kwargs: dict[str, Any] = {}
    if method == "cyclic":
        kwargs = {"plan": "cyclic", "order": "rotating"}
    else:
        kwargs = {"strategy": method, "strategy_kwargs": args.method_kwargs.get(method, {})}
    key = short_hash(
        {"kwargs": kwargs, "rounds": rounds, "train": train.to_dict(), "seed": seed, "sites": sites}
    )
    return ExperimentConfig(
        name=f"{method}-{key}", sites=tuple(sites), rounds=rounds, train=train, seed=seed, **kwargs
    )


def test_scores(
    train: TrainConfig, test: Mapping[str, SiteData], weights: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """``{"sites": {site: Dice}, "pooled": case-weighted mean}`` of ``weights`` on the test splits."""
    per_site: dict[str, dict[str, float]] = {}
    for site, data in test.items():
        if len(data):
            evaluator = LocalTrainer(train, data, device="cpu")
            per_site[site] = evaluator.evaluate(weights, records=data.records)
    return {
        "sites": {s: m[METRIC] for s, m in per_site.items()},
        "pooled": reporting.weighted_mean(per_site)[METRIC],
    }


def cached(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()``, stored as JSON at ``path`` and read from there when it exists."""
    if path.is_file():
        return json.loads(path.read_text())
    data = compute()
    reporting.write_json(path, data)
    return data


def run_setting_seed(
    args: argparse.Namespace, setting: str, seed: int, methods: Sequence[str]
) -> dict[str, Any]:
    """Every run of one (setting, seed): central, solo per site, each federated method."""
    root = args.workdir / f"{setting}-{seed}"
    folders = prepare_synthetic_sites(
        args.workdir / "data" / f"{setting}-{seed}",
        profiles=heterogeneity_profiles(setting, args.smallest),
        shape=tuple(args.shape),
        spatial_size=tuple(args.spatial_size),
        spacing_mm=tuple(args.spacing),
        seed=seed,
        progress=args.progress,
    )
    sites, test = split_test(
        {s: SiteData.from_dir(f, group=s) for s, f in folders.items()}, args.test_fraction, seed
    )
    train = TrainConfig(
        size=args.size,
        epochs=args.local_epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        val_fraction=args.val_fraction,
        seed=seed,
        amp=False,
    )
    n_train = {s: len(d.split(train.val_fraction, seed)[0]) for s, d in sites.items()}
    print(
        f"[{setting} seed {seed}] train cases {n_train}, test cases { {s: len(d) for s, d in test.items()} }",
        flush=True,
    )
    key = short_hash({"train": train.to_dict(), "epochs": args.epochs, "sites": sorted(sites)})

    def central() -> dict[str, Any]:
        result = train_centralized(sites, train, args.epochs, eval_every=args.epochs, progress=args.progress)
        return {
            "val": result.final,
            "test": test_scores(train, test, result.weights),
            "seconds": result.seconds,
        }

    def solo(site: str) -> dict[str, Any]:
        result = train_centralized(
            {site: sites[site]}, train, args.epochs, eval_every=args.epochs, progress=False
        )
        return {
            "test": test_scores(train, {site: test[site]}, result.weights)["sites"][site],
            "seconds": result.seconds,
        }

    out: dict[str, Any] = {"central": cached(root / f"central-{key}.json", central), "methods": {}}
    out["solo"] = {s: cached(root / f"solo-{s}-{key}.json", lambda s=s: solo(s)) for s in sites}
    for method in methods:
        config = experiment(args, method, list(sites), train, seed)

        def federated(config: ExperimentConfig = config) -> dict[str, Any]:
            result = simulate(sites, config, root / "runs" / config.name, progress=args.progress)
            return {
                "val_curve": result.curve(),
                "test": test_scores(train, test, result.weights),
                "seconds": result.seconds,
            }

        out["methods"][method] = cached(root / f"{config.name}.json", federated)
        run = out["methods"][method]
        print(
            f"[{setting} seed {seed}] {method}: val {run['val_curve'][-1]:.4f} test {run['test']['pooled']:.4f} "
            f"(central test {out['central']['test']['pooled']:.4f}) {run['seconds']:.0f} s",
            flush=True,
        )
    return out


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def summarise(
    setting: str, runs: list[dict[str, Any]], methods: Sequence[str], rounds: int
) -> dict[str, Any]:
    """Means over seeds and the figures the table and the goals need."""
    central_test = mean([r["central"]["test"]["pooled"] for r in runs])
    rows = {}
    for method in methods:
        test = mean([r["methods"][method]["test"]["pooled"] for r in runs])
        reached = []
        for r in runs:
            target = SPEED_TARGET * r["central"]["val"]
            curve = r["methods"][method]["val_curve"]
            reached.append(next((i for i, v in enumerate(curve) if v >= target), None))
        rows[method] = {
            "test": test,
            "ratio": test / central_test if central_test > 0 else math.nan,
            "val": mean([r["methods"][method]["val_curve"][-1] for r in runs]),
            "rounds_to_95": reached,
            "seconds": mean([r["methods"][method]["seconds"] for r in runs]),
        }
    best = max(methods, key=lambda m: rows[m]["val"])
    family = [m for m in methods if m in FEDAVG_FAMILY]
    best_default = max(family, key=lambda m: rows[m]["val"]) if family else None
    sites = sorted(runs[0]["solo"])
    per_site = {
        site: {
            "best": mean([r["methods"][best]["test"]["sites"][site] for r in runs]),
            "central": mean([r["central"]["test"]["sites"][site] for r in runs]),
            "solo": mean([r["solo"][site]["test"] for r in runs]),
        }
        for site in sites
    }
    return {
        "setting": setting,
        "seeds": len(runs),
        "central_test": central_test,
        "central_val": mean([r["central"]["val"] for r in runs]),
        "rows": rows,
        "best": best,
        "best_default": best_default,
        "per_site": per_site,
        "rounds": rounds,
    }


def print_summary(summary: dict[str, Any]) -> None:
    rounds = summary["rounds"]
    print(
        f"\n== {summary['setting']}: {summary['seeds']} seed(s), centralised test Dice {summary['central_test']:.4f} "
        f"(validation {summary['central_val']:.4f}), {rounds} rounds"
    )
    print(
        f"{'method':<10} {'test Dice':>9} {'FL/central':>10} {'val Dice':>8}  rounds to 95 % (per seed)  time s"
    )
    for method, row in summary["rows"].items():
        reached = ", ".join(f"> {rounds}" if r is None else str(r) for r in row["rounds_to_95"])
        print(
            f"{method:<10} {row['test']:>9.4f} {100 * row['ratio']:>9.2f} % {row['val']:>8.4f}  {reached:<24}  {row['seconds']:.0f}"
        )
    print(f"best on validation: {summary['best']}; per-site test Dice (mean over seeds):")
    print(f"{'site':<8} {summary['best']:>10} {'central':>8} {'ratio':>7} {'solo':>7}")
    for site, s in summary["per_site"].items():
        ratio = s["best"] / s["central"] if s["central"] > 0 else math.nan
        print(f"{site:<8} {s['best']:>10.4f} {s['central']:>8.4f} {100 * ratio:>6.1f}% {s['solo']:>7.4f}")


def check_goals(summary: dict[str, Any]) -> list[str]:
    """PASS / MISS lines for issue 12's three goals (meant for the strong setting)."""
    rows, best, family = summary["rows"], summary["best"], summary["best_default"]
    where = f"{summary['setting']}, {summary['seeds']} seed(s), test split"
    ratio = rows[best]["ratio"]
    out = [
        f"goal 1 {'PASS' if ratio >= RATIO_GOAL else 'MISS'}: best method {best} reaches {100 * ratio:.2f} % of "
        f"the centralised Dice (goal >= {100 * RATIO_GOAL:.0f} %; {where})"
    ]
    if family is None:
        out.append("goal 2 MISS: no FedAvg-family method (fedavg, fedavgm, fednova) was run")
    else:
        ratio = rows[family]["ratio"]
        out.append(
            f"goal 2 {'PASS' if ratio >= DEFAULT_GOAL else 'MISS'}: FedAvg-family default {family} reaches "
            f"{100 * ratio:.2f} % (goal >= {100 * DEFAULT_GOAL:.0f} %; {where})"
        )
    worst = min(summary["per_site"].items(), key=lambda kv: kv[1]["best"] / max(kv[1]["central"], 1e-9))
    ratio = worst[1]["best"] / max(worst[1]["central"], 1e-9)
    out.append(
        f"goal 3 {'PASS' if ratio >= SITE_GOAL else 'MISS'}: worst site under {best} is {worst[0]} at "
        f"{100 * ratio:.1f} % of the centralised model's Dice there (goal >= {100 * SITE_GOAL:.0f} %)"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rounds = args.epochs // args.local_epochs
    print(
        f"every run: {args.epochs} epochs ({rounds} rounds x {args.local_epochs} local epochs), U-Net {args.size}, "
        f"lr {args.lr}, batch {args.batch_size}, volumes {args.spatial_size}, test {args.test_fraction}, "
        f"validation {args.val_fraction}",
        flush=True,
    )
    summaries = []
    for setting in args.settings:
        strong = setting == "strong"
        methods = args.methods if strong else args.other_methods
        seeds = args.seeds if strong else args.other_seeds
        runs = [run_setting_seed(args, setting, seed, methods) for seed in seeds]
        summaries.append(summarise(setting, runs, methods, rounds))
        print_summary(summaries[-1])
    goals = []
    for summary in summaries:
        if summary["setting"] == "strong":
            goals = check_goals(summary)
    print()
    for line in goals:
        print(line)
    total = time.perf_counter() - started
    print(f"total wall time {total / 60:.1f} min")
    path = args.workdir / f"results{args.tag}.json"
    reporting.write_json(
        path,
        {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "summaries": summaries,
            "goals": goals,
            "seconds": total,
        },
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
