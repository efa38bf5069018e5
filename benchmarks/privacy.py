"""Privacy benchmark: Dice against ε for client-level and sample-level DP, and the cost of secure aggregation.

Data: the synthetic multi-site BraTS-like set (``jipfed.simulation.prepare_synthetic_sites``: DICOM
→ NIfTI → preprocessed, cached under ``--workdir``), ``--sites`` heterogeneous sites. Every run
trains the same tiny U-Net with FedAvg for ``--rounds`` rounds through
``jipfed.simulation.simulate`` (the protocol functions the Airflow DAGs call) and scores the final
global model's Dice on each site's held-out cases (mean over sites).

1. **No DP**: the reference Dice; its update norms give the client-level clip norm C (median of
   all sites' update norms over all rounds).
2. **Client-level DP** (DP-FedAvg, δ = ``--delta``) at each ``--budgets`` ε: the noise multiplier
   is the smallest that keeps ε after all rounds (opacus RDP, sampling rate 1).
3. **Sample-level DP** (DP-SGD at each site) at each ε: the noise multiplier is the smallest that
   keeps every site's own ε within the budget after all its steps (rate batch / training cases).
   Per-case clip norm: ``--max-grad-norm``, or (default) the ``--clip-quantile`` of the initial
   model's per-case gradient norms over all sites' training cases. That calibration reads the
   sites' data without accounting for it (a deployment takes C from public or proxy data; here the
   data are synthetic); it is printed so the run can be repeated with a fixed ``--max-grad-norm``.
4. **Secure aggregation cost** with ``--sites`` sites, for the trained model's shapes: seconds a
   site spends on key agreement + masking, the central's unmasking, against plain aggregation and
   the no-DP run's measured round wall time; bytes per site per round masked vs fp32.

Two settings, both reported with PASS/MISS for the goal (≥ 95 % of the no-DP Dice at ε ≤ 8):
the test size (``--cases 12``) and a cohort (``--cohort``: 64 cases per site on a 16³ grid, which
runs in minutes on one core); ``--size`` picks the U-Net preset (``micro``: 6,293 weights, the
size for DP; default ``tiny``: 31,401). Every Dice is also put against the metric's floor, the
Dice of predicting no tumour anywhere (an empty region scores 1 on a case that has none of it):
a DP run that learnt nothing but "background" lands there, which can be a large share of a
weak non-private Dice, so the benchmark prints the share of the non-private gain above the floor
too. Client-level noise on the mean is ``z·C/n_sites`` per coordinate; the benchmark prints its
norm against the mean update's and how many sites would bring it down to the update's norm.

5. **From a public model** (``--public-cases N``): a "public" synthetic set of N cases that is none
   of the sites' data (its own generator seed, held only by the pretraining run) is trained without
   DP for ``--public-rounds`` rounds as its own one-site experiment ``public-pre``; every run above
   (no DP and each ε, both levels) then starts from its final model (``ExperimentConfig.initial_model``,
   all experiments in one store) and only fine-tunes. Printed as well: the pretrained model's Dice
   on the sites' held-out cases before federated training, and each run's share of the no-DP gain
   over that start (a good start alone is not DP working). The DP-SGD clip norm is calibrated on
   the pretrained model's per-case gradients. ``--public-sites S`` draws the public cases from S
   heterogeneous site profiles (like the sites' scanners; still their own seed), pooled.

6. **A larger cohort** (``--cohort-cases N``): N cases per site on the same 16³ grid (heterogeneous
   sites, so 0.43 N to 1.07 N training cases each), batch 64 (``--batch-size``), and each site's own
   DP-SGD noise multiplier from its budget (``--site-noise``: the form's empty noise multiplier, so a
   larger site is not held to the smallest site's noise). DP-SGD's noise per step falls with the
   sampling rate batch / training cases; the data (slow to generate: DICOM → NIfTI → preprocessed,
   about 1 s a case here) are shared by every size, lr and batch. ``--nodp-batch B`` also trains the
   no-DP reference at batch B; the better no-DP run is the reference of every share.

7. **Augmentation multiplicity** (``--augment-views K``, sample level; De et al. 2022): each case's
   per-sample gradient is the mean over K augmented views of it (flips, small shifts) before it is
   clipped (``sample_dp.augment_views``): the same ε, K forward / backward passes per case.
   ``--best-nodp D`` adds the share of D (the best no-DP Dice of any setup, from another run) to the
   PASS / MISS line.

``--nodp-lrs`` trains the no-DP reference at more learning rates (e.g. the DP runs' ``--dp-lr``); the
best no-DP run is the reference. ``--dp-repeat N`` repeats the DP runs with fresh noise (own cache).

Run: ``nice -n 10 .venv/bin/python benchmarks/privacy.py > /tmp/privacy.log 2>&1`` (``--quick``: a
smoke run of a few minutes); the DP-sized model:
``nice -n 10 .venv/bin/python benchmarks/privacy.py --cohort --rounds 30 --size micro --lr 0.03``.
Results: ``<workdir>/results.json``; finished runs are cached (the workdir name carries the size
and lr when they are not the defaults, and ``-public<N>x<rounds>`` with a public start; the sites'
data stay in the workdir without that suffix).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import logging
import math
import re
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from jipfed.federation.aggregate import mean_weights
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.update import ModelUpdate
from jipfed.privacy import secagg
from jipfed.privacy.accountant import noise_for_budget
from jipfed.privacy.poisson_sampling import dp_sample_rate
from jipfed.privacy.secure_round import secure_mean_delta
from jipfed.privacy.settings import SecureAggregation
from jipfed.simulation import prepare_synthetic_sites, simulate, site_train_sizes
from jipfed.training.config import SIZES, TrainConfig
from jipfed.training.data import SiteData, pooled_data

DICE_GOAL = 0.95
EPSILON_GOAL = 8.0
SECAGG_GOAL = 0.10
#: Generator seed of the public pretraining set (the sites' data are drawn from seed 0).
PUBLIC_SEED = 1_000_003
PUBLIC_EXPERIMENT = "public-pre"
#: Default batch of ``--cohort-cases``: the sampling rate batch / training cases stays small with hundreds of cases.
LARGE_COHORT_BATCH = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jipfed-privacy"))
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--cases", type=int, default=12, help="cases per site")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help="DP-SGD per-case clip norm (default: --clip-quantile)",
    )
    parser.add_argument(
        "--clip-quantile",
        type=float,
        default=0.5,
        help="C = this quantile of the initial per-case grad norms",
    )
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--dp-lr", type=float, default=None, help="learning rate of the DP runs (default --lr)"
    )
    parser.add_argument(
        "--dp-optimizer",
        choices=["adam", "sgd"],
        default="adam",
        help="optimiser of the DP runs (sgd: momentum 0.9; the no-DP reference keeps adam)",
    )
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=None,
        help="sample level: each site sends the EMA of its DP-SGD iterates with this decay (sample_dp.ema_decay)",
    )
    parser.add_argument(
        "--trainable",
        nargs="+",
        default=None,
        help="sample level: only these parameter name patterns train under DP-SGD (sample_dp.trainable)",
    )
    parser.add_argument(
        "--augment-views",
        type=int,
        default=1,
        help="sample level: each case's gradient is the mean over this many augmented views before clipping "
        "(sample_dp.augment_views; 1 = off)",
    )
    parser.add_argument(
        "--dp-repeat",
        type=int,
        default=0,
        help="sample level: a repetition number (> 0: its own cached runs, i.e. fresh DP noise and the same data)",
    )
    parser.add_argument(
        "--best-nodp",
        type=float,
        default=None,
        help="the best no-DP Dice of any setup (from another run); the PASS/MISS line also gives its share",
    )
    parser.add_argument(
        "--nodp-batch",
        type=int,
        default=None,
        help="also train the no-DP reference at this batch (lr --lr); the better no-DP run is the reference",
    )
    parser.add_argument(
        "--nodp-lrs",
        type=float,
        nargs="+",
        default=[],
        help="also train the no-DP reference at these learning rates (each batch); the best no-DP run is the reference",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"default 2 (--cohort: 16, --cohort-cases: {LARGE_COHORT_BATCH})",
    )
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 48, 32])
    parser.add_argument("--spatial-size", type=int, nargs=3, default=[24, 24, 24])
    parser.add_argument("--spacing", type=float, nargs=3, default=[4.0, 4.0, 4.0])
    parser.add_argument("--levels", nargs="+", choices=["client", "sample"], default=["client", "sample"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: 16^3 grid, 3 rounds, 6 cases")
    parser.add_argument("--cohort", action="store_true", help="64 cases per site on a 16^3 grid, batch 16")
    parser.add_argument(
        "--cohort-cases",
        type=int,
        default=0,
        help="a larger cohort: this many cases per site on the 16^3 grid, batch --batch-size (default "
        f"{LARGE_COHORT_BATCH}), sample-level noise chosen by each site (0: off)",
    )
    parser.add_argument(
        "--site-noise",
        action="store_true",
        help="sample level: each site takes the smallest noise that keeps its own epsilon (the form's empty "
        "noise multiplier) instead of the largest over all sites (implied by --cohort-cases)",
    )
    parser.add_argument(
        "--size", choices=SIZES, default="tiny", help="U-Net size preset (default %(default)s)"
    )
    parser.add_argument(
        "--public-cases",
        type=int,
        default=0,
        help="pretrain on this many public cases (not the sites') and fine-tune every run from it (0: off)",
    )
    parser.add_argument("--public-rounds", type=int, default=20, help="epochs of the public pretraining")
    parser.add_argument(
        "--public-sites",
        type=int,
        default=1,
        help="draw the public cases from this many heterogeneous site profiles (like the sites', own seed; "
        "pooled into one pretraining site) instead of one",
    )
    parser.add_argument(
        "--public-batch",
        type=int,
        default=None,
        help="batch of the public pretraining (default --batch-size)",
    )
    parser.add_argument(
        "--public-lr", type=float, default=None, help="learning rate of the public pretraining (default --lr)"
    )
    args = parser.parse_args(argv)
    check_cohort_args(parser, args)
    if args.quick or args.cohort or args.cohort_cases:
        args.shape, args.spatial_size, args.spacing = [32, 32, 24], [16, 16, 16], [8.0, 8.0, 8.0]
    batch, args.batch_size = args.batch_size, args.batch_size or 2
    if args.quick:
        args.cases, args.rounds = 6, 3
        args.workdir = args.workdir.with_name(args.workdir.name + "-quick")
    if args.cohort:
        args.cases, args.batch_size = 64, 16
        args.workdir = args.workdir.with_name(args.workdir.name + "-cohort")
    if args.cohort_cases:
        args.cases, args.site_noise = args.cohort_cases, True
        args.batch_size = batch or LARGE_COHORT_BATCH
        args.workdir = args.workdir.with_name(f"{args.workdir.name}-cohort{args.cohort_cases}")
        args.data_dir = args.workdir / "data"  # shared by every size, lr and batch: generating it takes long
        args.workdir = args.workdir.with_name(f"{args.workdir.name}-b{args.batch_size}")
    if (args.size, args.lr) != ("tiny", 3e-3):  # cached runs are named by level and ε only
        args.workdir = args.workdir.with_name(f"{args.workdir.name}-{args.size}-lr{args.lr:g}")
    if not args.cohort_cases:
        args.data_dir = args.workdir / "data"
    args.initial_model = None  # set once the public model is trained
    if args.public_cases:
        args.workdir = args.workdir.with_name(
            f"{args.workdir.name}-public{args.public_cases}x{args.public_rounds}"
            + (f"-sites{args.public_sites}" if args.public_sites != 1 else "")
            + (f"-b{args.public_batch}" if args.public_batch else "")
            + (f"-lr{args.public_lr:g}" if args.public_lr else "")
        )
    return args


def check_cohort_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error for a large cohort combined with another preset or too small for its batch."""
    if not args.cohort_cases:
        return
    if args.cohort or args.quick:
        parser.error("--cohort-cases replaces --cohort / --quick (same 16^3 grid, more cases); give only one")
    batch = args.batch_size or LARGE_COHORT_BATCH
    if args.cohort_cases < batch:
        parser.error(
            f"--cohort-cases {args.cohort_cases} is too small for batch {batch}: give at least one batch of "
            "cases per site (a batch above a site's training cases takes every case, sample rate 1)"
        )


def cached(path: Path, compute: Any) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def final_dice(result: Any) -> float:
    return float(result.final)


def run(
    args: argparse.Namespace,
    sites: Mapping[str, SiteData],
    name: str,
    train: TrainConfig,
    privacy: dict,
    rounds: int | None = None,
) -> dict[str, Any]:
    """One FedAvg experiment (cached by name): final mean Dice, seconds, per-round privacy records.

    With a public start every run but the pretraining itself starts from ``args.initial_model``.
    """

    def compute() -> dict[str, Any]:
        config = ExperimentConfig(
            name=name,
            sites=tuple(sites),
            rounds=rounds or args.rounds,
            train=train,
            privacy=privacy,
            norm_bound_factor=None,
            initial_model=None if name == PUBLIC_EXPERIMENT else args.initial_model,
        )
        result = simulate(
            sites,
            config,
            args.workdir / "runs" / name,
            progress=False,
            device="cpu",
            store_dir=store_dir(args, name),
        )
        return {
            "dice": final_dice(result),
            "curve": result.curve(),
            "seconds": result.seconds,
            "privacy": [dict(r.metrics.get("privacy") or {}) for r in result.history],
            "site_epsilon": [
                {s: m.get("dp_epsilon") for s, m in r.metrics.get("sites", {}).items()}
                for r in result.history
            ],
        }

    path = args.workdir / "runs" / f"{name}.json"
    out = cached(path, compute)
    if len(out["curve"]) != (rounds or args.rounds) + 1:  # the cache name does not carry the rounds
        raise SystemExit(
            f"{path}: a cached run of {len(out['curve']) - 1} rounds, not {rounds or args.rounds}; "
            "give these rounds their own --workdir"
        )
    return out


def store_dir(args: argparse.Namespace, name: str) -> Path:
    """One store for all runs with a public start (they start from its model), else one per run."""
    return args.workdir / "store" if args.public_cases else args.workdir / "runs" / name / "store"


def no_dp_references(
    args: argparse.Namespace, sites: Mapping[str, SiteData], train: TrainConfig, base: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The no-DP runs every share is taken against (the best of them is the reference), by setting:
    ``base`` (batch, --lr), ``--nodp-batch`` at --lr, and ``--nodp-lrs`` at each batch."""
    batches = [args.batch_size] + (
        [args.nodp_batch] if args.nodp_batch not in (None, args.batch_size) else []
    )
    references = {f"batch {args.batch_size} lr {train.lr:g}": base}
    for lr in [train.lr, *(x for x in args.nodp_lrs if x != train.lr)]:
        for batch in batches:
            label = f"batch {batch} lr {lr:g}"
            if label not in references:
                name = f"nodp-b{batch}" + (f"-lr{lr:g}".replace(".", "p") if lr != train.lr else "")
                other = dataclasses.replace(train, batch_size=batch, lr=lr)
                references[label] = run(args, sites, name, other, {})
    return references


def run_root(args: argparse.Namespace, name: str) -> Path:
    return store_dir(args, name) / "experiments" / name / "rounds"


def pretrain_public(args: argparse.Namespace, train: TrainConfig) -> dict[str, Any]:
    """Train ``PUBLIC_EXPERIMENT`` without DP on the public cases (a one-site experiment; with
    ``--public-sites`` the cases of that many heterogeneous site profiles, pooled)."""
    folders = prepare_synthetic_sites(
        args.workdir / "public-data",
        n_sites=args.public_sites,
        cases_per_site=args.public_cases // args.public_sites,
        shape=tuple(args.shape),
        spatial_size=tuple(args.spatial_size),
        spacing_mm=tuple(args.spacing),
        seed=PUBLIC_SEED,
        progress=False,
    )
    public = {
        "public": pooled_data(
            [SiteData.from_dir(folder, group=f"public-{site}") for site, folder in folders.items()]
        )
    }
    train = dataclasses.replace(
        train, batch_size=args.public_batch or train.batch_size, lr=args.public_lr or train.lr
    )
    result = run(args, public, PUBLIC_EXPERIMENT, train, {}, rounds=args.public_rounds)
    args.initial_model = PUBLIC_EXPERIMENT
    return {**result, "training_cases": site_train_sizes(public, train)["public"]}


def base_weights(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    return safetensors.torch.load((run_root(args, "nodp") / "0" / "global.safetensors").read_bytes())


def mean_update_norm(args: argparse.Namespace, name: str) -> float:
    """Median over rounds of the L2 norm of the change of the global model (the mean update)."""
    root = run_root(args, name)
    rounds = sorted(int(p.name) for p in root.iterdir() if (p / "global.safetensors").is_file())
    models = [safetensors.torch.load((root / str(r) / "global.safetensors").read_bytes()) for r in rounds]
    norms = [
        math.sqrt(
            sum(float((b[k].double() - a[k].double()).pow(2).sum()) for k in a if a[k].is_floating_point())
        )
        for a, b in zip(models, models[1:], strict=False)
    ]
    return statistics.median(norms) if norms else math.nan


def update_norms(args: argparse.Namespace, name: str) -> list[float]:
    """L2 norms of every stored site update (fp32 deltas) of a finished run."""
    root = run_root(args, name)
    norms = []
    for path in sorted(root.glob("*/updates/*.safetensors")):
        tensors = safetensors.torch.load(path.read_bytes())
        norms.append(
            math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values() if t.is_floating_point()))
        )
    return norms


def per_case_grad_norms(
    sites: Mapping[str, SiteData],
    train: TrainConfig,
    limit: int = 32,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> list[float]:
    """L2 norms of the initial model's (or ``weights``') per-case gradients (task loss) on up to
    ``limit`` training cases a site."""
    from opacus import GradSampleModule

    from jipfed.training.data import CaseDataset, make_loader
    from jipfed.training.local import LocalTrainer
    from jipfed.training.models import build_model

    model = build_model(train)
    if weights is not None:
        model.load_state_dict(dict(weights), strict=False)  # the shared entries of a warm start
    module = GradSampleModule(model)
    norms: list[float] = []
    for data in sites.values():
        loss_fn = LocalTrainer(train, data, device="cpu")._loss_fn()
        records = data.split(train.val_fraction, train.seed)[0][:limit]
        for batch in make_loader(CaseDataset(records, train.task, augment=False), 8, shuffle=False):
            model.zero_grad(set_to_none=True)
            loss_fn(module(batch["image"]), batch["label"]).backward()
            squares = sum(p.grad_sample.flatten(1).double().pow(2).sum(1) for p in model.parameters())
            norms += [float(v) for v in squares.sqrt()]  # opacus undoes the mean loss's 1/B
            for p in model.parameters():
                p.grad_sample = None
    module._close()
    return norms


def empty_prediction_dice(sites: Mapping[str, SiteData], train: TrainConfig) -> float:
    """Mean over sites of the Dice of predicting no tumour anywhere (the metric's floor: an empty
    region scores 1 where the case has none of it), to show how far above it a Dice is."""
    from jipfed.training.data import CaseDataset
    from jipfed.training.metrics import RegionDice

    scores = []
    for data in sites.values():
        metric = RegionDice()
        for item in CaseDataset(data.split(train.val_fraction, train.seed)[1], train.task):
            label = item["label"][None]
            metric.update(torch.full_like(label, -1.0), label)
        scores.append(metric.result()["dice_mean"])
    return statistics.mean(scores)


def gain_share(row: Mapping[str, Any] | None, base: Mapping[str, Any], floor: float) -> float:
    """(Dice - floor) / (no-DP Dice - floor): the share of what the non-private model learnt beyond predicting nothing."""
    if row is None or base["dice"] <= floor:
        return math.nan
    return (row["dice"] - floor) / (base["dice"] - floor)


#: Rounds a run's tail mean covers: a single round's Dice jitters by about ±0.02 here.
TAIL_ROUNDS = 5


def tail_mean(run: Mapping[str, Any]) -> float:
    """Mean Dice of the run's last :data:`TAIL_ROUNDS` rounds (fewer in a shorter run)."""
    curve = run["curve"][1:] or run["curve"]  # round 0 is the start, not trained
    tail = curve[-TAIL_ROUNDS:]
    return sum(tail) / len(tail)


def quantile(values: list[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def client_noise_report(args: argparse.Namespace, row: Mapping[str, Any], update_norm: float, n: int) -> str:
    """Client-level noise on the mean (z·C/n per coordinate, norm ·sqrt(d)) against the mean update's norm."""
    clip = row["privacy"][-1].get("clip_norm", math.nan)
    noise_norm = row["noise"] * clip * math.sqrt(n) / args.sites
    needed = math.ceil(row["noise"] * clip * math.sqrt(n) / update_norm)
    return (
        f"         noise on the mean: std {row['noise'] * clip / args.sites:.3g} per coordinate, norm "
        f"{noise_norm:.3g} vs mean update norm {update_norm:.3g} ({noise_norm / update_norm:.0f}x); "
        f"~{needed} sites would bring it down to the update's norm"
    )


def site_noises(
    args: argparse.Namespace, sites: Mapping[str, SiteData], train: TrainConfig, epsilon: float
) -> dict[str, float]:
    """Each site's smallest DP-SGD noise multiplier keeping it within ``epsilon`` after all its steps
    (what a site with an empty noise multiplier chooses, ``DPSGD.calibrate``)."""
    noises = {}
    for site, data in sites.items():
        n_train = len(data.split(train.val_fraction, train.seed)[0])
        steps = args.rounds * math.ceil(n_train / args.batch_size)
        noises[site] = noise_for_budget(
            epsilon, steps, delta=args.delta, sample_rate=dp_sample_rate(args.batch_size, n_train)
        )
    return noises


def sample_privacy(args: argparse.Namespace, epsilon: float, noise: float, clip: float) -> dict[str, Any]:
    """The experiment's ``sample_dp`` settings: one noise for all sites, or (``--site-noise``) each site's own;
    with ``--ema-decay`` / ``--trainable`` / ``--augment-views`` the iterate average, the trained parameters
    and the augmented views per case."""
    settings = {"epsilon": epsilon, "delta": args.delta, "max_grad_norm": clip, "noise_multiplier": noise}
    if args.site_noise:
        settings.update(noise_multiplier=None, planned_rounds=args.rounds)
    if args.ema_decay is not None:
        settings["ema_decay"] = args.ema_decay
    if args.trainable:
        settings["trainable"] = list(args.trainable)
    if args.augment_views != 1:
        settings["augment_views"] = args.augment_views
    return {"sample_dp": settings}


def sample_run_name(args: argparse.Namespace, epsilon: float, clip: float, lr: float) -> str:
    """Cache name of a sample-level run: every setting that changes its result."""
    name = f"sample-poisson-eps{epsilon:g}-C{clip:.4g}-lr{lr:g}"  # Poisson batches (shuffled ones before)
    if args.dp_optimizer != "adam":
        name += f"-{args.dp_optimizer}"
    if args.ema_decay is not None:
        name += f"-ema{args.ema_decay:g}"
    if args.augment_views != 1:
        name += f"-views{args.augment_views}"
    if args.dp_repeat:
        name += f"-rep{args.dp_repeat}"
    name = name.replace(".", "p")
    if args.trainable:
        name += "-train-" + "+".join(re.sub(r"[^A-Za-z0-9]+", "", p) for p in args.trainable)
    return name + ("-site-noise" if args.site_noise else "")


def secagg_cost(
    args: argparse.Namespace, like: Mapping[str, torch.Tensor], round_seconds: float
) -> dict[str, Any]:
    """Seconds and bytes of secure aggregation for one round of ``args.sites`` sites of model ``like``."""
    settings = SecureAggregation()
    names = [f"site-{i}" for i in range(args.sites)]
    gen = torch.Generator().manual_seed(0)
    updates = [
        ModelUpdate.build(
            {
                k: torch.randn(v.shape, generator=gen) * 1e-3 if v.is_floating_point() else v
                for k, v in like.items()
            },
            experiment="bench",
            round=0,
            site=s,
            kind="delta",
            n_samples=10,
            config_hash="0" * 64,
        )
        for s in names
    ]
    repeats = 3
    start = time.perf_counter()
    for _ in range(repeats):
        mean_weights(like, updates)
    plain = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        secure_mean_delta(updates, like, settings, experiment="bench", round=0)
    secure = (time.perf_counter() - start) / repeats
    values = secagg.flatten({k: v for k, v in like.items() if v.is_floating_point()})
    private = {s: secagg.new_private_key() for s in names}
    public = {s: secagg.public_bytes(k) for s, k in private.items()}
    start = time.perf_counter()
    vectors = [
        secagg.masked_vector(
            s, values, 10.0, private[s], {p: b for p, b in public.items() if p != s}, "bench", settings
        )
        for s in names
    ]
    per_site = (time.perf_counter() - start) / len(names)
    start = time.perf_counter()
    for _ in range(repeats):
        secagg.unmask_mean(vectors, settings)
    central = (time.perf_counter() - start) / repeats
    n = values.size
    plain_bytes = 4 * n
    masked_bytes = (
        8 * (n + 1) + secagg.PUBLIC_KEY_BYTES * args.sites
    )  # vector + own key up + peers' keys down
    # sites mask in parallel: a round waits for one site's masking plus the central's unmasking (counted
    # on top of, not instead of, the plain aggregation: conservative). Not measured: the extra exchange
    # of the wire protocol (post a key, wait for the peers' keys), which is not wired yet.
    extra = per_site + central
    return {
        "parameters": n,
        "plain_aggregate_s": plain,
        "secure_in_process_s": secure,
        "site_mask_s": per_site,
        "central_unmask_s": central,
        "round_s": round_seconds,
        "extra_fraction": extra / round_seconds,
        "plain_bytes": plain_bytes,
        "masked_bytes": masked_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # each run's line as it finishes
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    folders = prepare_synthetic_sites(
        args.data_dir,
        n_sites=args.sites,
        cases_per_site=args.cases,
        shape=tuple(args.shape),
        spatial_size=tuple(args.spatial_size),
        spacing_mm=tuple(args.spacing),
        progress=False,
    )
    sites = {site: SiteData.from_dir(folder, group=site) for site, folder in folders.items()}
    train = TrainConfig(
        size=args.size, epochs=1, batch_size=args.batch_size, lr=args.lr, amp=False, val_fraction=0.25
    )
    public = pretrain_public(args, train) if args.public_cases else None
    base = run(args, sites, "nodp", train, {})
    references = no_dp_references(args, sites, train, base)
    ref_label, reference = max(references.items(), key=lambda item: item[1]["dice"])
    start = base["curve"][0]  # round 0: the seeded or the pretrained model on the sites' held-out cases
    norms = update_norms(args, "nodp")
    clip = statistics.median(norms)
    mean_update = mean_update_norm(args, "nodp")
    dp_train = dataclasses.replace(train, lr=args.dp_lr or args.lr, optimizer=args.dp_optimizer)
    start_weights = base_weights(args) if public else None
    case_norms = (
        per_case_grad_norms(sites, dp_train, weights=start_weights) if args.max_grad_norm is None else []
    )
    grad_clip = args.max_grad_norm or quantile(case_norms, args.clip_quantile)
    n_params = sum(v.numel() for v in base_weights(args).values() if v.is_floating_point())
    n_noised = sum(  # the weights DP-SGD trains and noises
        v.numel()
        for k, v in base_weights(args).items()
        if v.is_floating_point()
        and (not args.trainable or any(fnmatch.fnmatchcase(k, p) for p in args.trainable))
    )
    floor = empty_prediction_dice(sites, train)
    print(
        f"sites {args.sites}, cases {args.cases} (training per site: {site_train_sizes(sites, train)}), rounds "
        f"{args.rounds}, batch {args.batch_size}, grid {args.spatial_size}, delta {args.delta}, U-Net "
        f"'{args.size}' with {n_params} parameters, lr {args.lr}, DP lr {dp_train.lr}, DP optimiser "
        f"{args.dp_optimizer}, DP-SGD iterate EMA {args.ema_decay}, DP-SGD trains {args.trainable or 'all'}, "
        f"augmented views per case {args.augment_views}"
    )
    print(
        f"no DP: Dice {base['dice']:.4f} ({base['seconds']:.0f} s; predicting no tumour scores {floor:.4f}); "
        f"site update norms median {clip:.4f}, mean update norm (median over rounds) {mean_update:.4f}"
    )
    if len(references) > 1:
        print(
            "no DP by setting: "
            + ", ".join(f"{b}: Dice {r['dice']:.4f} ({r['seconds']:.0f} s)" for b, r in references.items())
            + f" -> reference: {ref_label}, Dice {reference['dice']:.4f}"
        )
    if public:
        print(
            f"public start: {public['training_cases']} public training cases (generator seed {PUBLIC_SEED}, none "
            f"of the sites'), {args.public_rounds} epochs without DP ({public['seconds']:.0f} s); its Dice on "
            f"the sites' held-out cases {start:.4f} before federated training, {base['dice']:.4f} after "
            f"{args.rounds} no-DP rounds (gain {base['dice'] - start:+.4f})"
        )
    if case_norms:
        print(
            f"initial per-case gradient norms: min {min(case_norms):.4f} median {quantile(case_norms, 0.5):.4f} "
            f"max {max(case_norms):.4f} -> DP-SGD clip norm C = {grad_clip:.4f} (quantile {args.clip_quantile})"
        )
    rows: list[dict[str, Any]] = []
    for level in args.levels:
        for eps in args.budgets:
            if level == "client":
                privacy = {"client_dp": {"epsilon": eps, "delta": args.delta, "clip_norm": clip}}
                name = f"client-eps{eps:g}"
            else:
                noises = site_noises(args, sites, train, eps)
                z = max(noises.values())
                privacy = sample_privacy(args, eps, z, grad_clip)
                name = sample_run_name(args, eps, grad_clip, dp_train.lr)
            out = run(args, sites, name, dp_train if level == "sample" else train, privacy)
            if level == "client":
                last = out["privacy"][-1]
                spent, z = last["epsilon_total"], last["noise_multiplier"]
            else:
                spent = max(v for v in out["site_epsilon"][-1].values() if v is not None)
            rows.append({"level": level, "budget": eps, "noise": z, "spent": spent, **out})
            ratio = out["dice"] / reference["dice"] if reference["dice"] > 0 else math.nan
            print(
                f"{level:6s} eps {eps:5g}: noise multiplier {z:7.3f}, spent {spent:6.3f}, "
                f"Dice {out['dice']:.4f} ({ratio:6.1%} of no DP; last {TAIL_ROUNDS} rounds' mean "
                f"{tail_mean(out):.4f}, {tail_mean(out) / tail_mean(reference):6.1%} of no DP's"
                + (
                    f", {gain_share(out, reference, start):6.1%} of its gain over the public start)"
                    if public
                    else ")"
                )
            )
            if level == "client":
                print(client_noise_report(args, rows[-1], mean_update, n_params))
            else:
                if args.site_noise:
                    print(
                        "         each site's noise multiplier: "
                        + ", ".join(f"{s} {v:.3f}" for s, v in noises.items())
                    )
                step_noise = min(noises.values()) if args.site_noise else z
                step_noise *= grad_clip / args.batch_size
                print(
                    f"         noise on each step's mean gradient (least noised site): std {step_noise:.3g} per "
                    f"coordinate over {n_noised} trained weights, norm {step_noise * math.sqrt(n_noised):.3g} vs that "
                    f"gradient's norm <= C = {grad_clip:.3g} ({step_noise * math.sqrt(n_noised) / grad_clip:.1f}x or more)"
                )
    cost = secagg_cost(args, base_weights(args), base["seconds"] / args.rounds)
    print(
        f"secure aggregation, {args.sites} sites, {cost['parameters']} parameters: site masking "
        f"{cost['site_mask_s'] * 1e3:.1f} ms, central unmasking {cost['central_unmask_s'] * 1e3:.1f} ms, plain "
        f"aggregation {cost['plain_aggregate_s'] * 1e3:.1f} ms, whole protocol in one process "
        f"{cost['secure_in_process_s'] * 1e3:.1f} ms; round wall time {cost['round_s']:.2f} s -> "
        f"+{cost['extra_fraction']:.2%}; bytes per site {cost['masked_bytes']} vs {cost['plain_bytes']} fp32 "
        f"({cost['masked_bytes'] / cost['plain_bytes']:.2f}x)"
    )
    for level in args.levels:
        tried = [r for r in rows if r["level"] == level and r["budget"] <= EPSILON_GOAL]
        best = max(tried, key=lambda r: r["dice"], default=None)
        share = best["dice"] / reference["dice"] if best and reference["dice"] > 0 else math.nan
        print(
            ("PASS" if best and share >= DICE_GOAL else "MISS")
            + f" ({level}, {args.cases} cases per site): best at eps <= {EPSILON_GOAL:g} keeps {share:.1%} "
            f"of the non-private Dice (goal {DICE_GOAL:.0%}); above the no-tumour floor {floor:.4f}: "
            f"{gain_share(best, reference, floor):.1%} of the non-private gain"
            + (
                f"; over the public start {start:.4f}: {gain_share(best, reference, start):.1%} of the no-DP gain"
                if public
                else ""
            )
            + (
                f"; {best['dice'] / args.best_nodp:.1%} of the best no-DP Dice of any setup ({args.best_nodp:.4f})"
                if best and args.best_nodp
                else ""
            )
            + (
                f"; its last {TAIL_ROUNDS} rounds' mean {tail_mean(best) / tail_mean(reference):.1%} of the no-DP's"
                if best
                else ""
            )
        )
    print(
        ("PASS" if cost["extra_fraction"] <= SECAGG_GOAL else "MISS")
        + f": secure aggregation adds <= {SECAGG_GOAL:.0%}"
    )
    (args.workdir / "results.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "base": base,
                "references": {label: r["dice"] for label, r in references.items()},
                "floor": floor,
                "start_dice": start,
                "public": public,
                "rows": rows,
                "secagg": cost,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
