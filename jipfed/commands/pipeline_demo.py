"""``jipfed pipeline-demo``: the site data pipeline on synthetic sites with their own PACS, no Airflow.

Steps: write a synthetic multi-site data set (``jipfed synth``) → start one Orthanc per site and
upload the site's DICOM over STOW-RS → prepare every site (cohort over QIDO-RS, fetch over
WADO-RS or DIMSE C-GET, sites alternating, convert, preprocess) → prepare every site again, which
finds everything cached → print what each pass did per site → train a small 3-D U-Net
federatedly over the prepared sites (FedAvg, a few rounds, through the same round-protocol functions
the Airflow DAGs call) → print the per-round Dice table and the path of the plot.

Everything is kept under ``--workdir`` (PACS storage, site data, reports, the model store, metrics
and plot); a later run reuses its caches.
"""

from __future__ import annotations

import argparse
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from jipfed.commands.arguments import positive_int
from jipfed.commands.simulate import format_table as format_rounds
from jipfed.federation.experiment import ExperimentConfig
from jipfed.imaging.dicomweb import upload_folder
from jipfed.imaging.pacs import PacsError
from jipfed.imaging.pipeline import TRANSPORTS, PrepareReport, SiteDataConfig, prepare_site
from jipfed.imaging.synth import DEFAULT_SHAPE, ORIENTATIONS, default_site_profiles, write_dataset
from jipfed.local.orthanc import OrthancError, OrthancServer
from jipfed.simulation import SimulationResult, simulate
from jipfed.training.config import TrainConfig
from jipfed.training.data import SiteData

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassResult:
    """One site's :func:`prepare_site` run in one pass, with its wall time in seconds."""

    pass_no: int
    report: PrepareReport
    seconds: float


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``demo`` and its options."""
    parser = subparsers.add_parser(
        "pipeline-demo",
        help="run the site data pipeline end to end on synthetic sites, then in-process FL",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("demo-output/pipeline"),
        help="where everything is kept (default %(default)s)",
    )
    parser.add_argument("--sites", type=positive_int, default=3, help="number of sites (default %(default)s)")
    parser.add_argument(
        "--cases", type=positive_int, default=6, help="cases per site on average (default %(default)s)"
    )
    parser.add_argument(
        "--shape",
        type=positive_int,
        nargs=3,
        metavar=("ROWS", "COLS", "SLICES"),
        default=list(DEFAULT_SHAPE),
        help="synthetic image size (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed (default %(default)s)")
    parser.add_argument(
        "--rounds", type=int, default=8, help="federated rounds; 0 = data pipeline only (default %(default)s)"
    )
    parser.add_argument("--strategy", default="fedavg", help="server strategy (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """0 when every site ends with all its cases preprocessed, 1 otherwise, 2 when a PACS failed."""
    workdir = args.workdir
    try:
        results = run_demo(
            workdir,
            n_sites=args.sites,
            cases_per_site=args.cases,
            shape=tuple(args.shape),
            seed=args.seed,
            progress=not args.no_progress,
        )
    except (PacsError, OrthancError) as err:
        logger.error("demo: %s", err)
        return 2
    print(format_table(results))
    last = [r.report for r in results if r.pass_no == 2]
    if not all(r.ready_cases == r.cohort_cases for r in last):
        return 1
    if args.rounds > 0:
        fed = run_federation(
            workdir,
            last,
            rounds=args.rounds,
            strategy=args.strategy,
            seed=args.seed,
            progress=not args.no_progress,
        )
        print(
            f"\nFederated training ({args.strategy}, {args.rounds} rounds; global = all sites' held-out cases):"
        )
        print(format_rounds(list(fed.rows), fed.metric))
        print(f"\nplot: {fed.plot}\nmetrics: {fed.metrics_csv}")
    print(f"\nEverything is kept under {workdir} (a second run reuses its caches).")
    return 0


def run_demo(
    workdir: Path,
    *,
    n_sites: int = 3,
    cases_per_site: int = 6,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    seed: int = 0,
    progress: bool = True,
) -> list[PassResult]:
    """Synthesize, serve, upload and prepare every site twice; return the per-site results.

    Site ``i`` fetches over ``TRANSPORTS[i % 2]`` (dicomweb, cget, dicomweb, ...); slice
    orientations cycle over axial, sagittal, coronal and oblique.
    """
    profiles = default_site_profiles(n_sites, cases_per_site, orientations=ORIENTATIONS)
    synth_dir = workdir / "synth"
    write_dataset(synth_dir, profiles, shape=shape, seed=seed, progress=progress)
    results: list[PassResult] = []
    with ExitStack() as stack:
        configs = []
        for index, profile in enumerate(profiles):
            pacs = stack.enter_context(OrthancServer(workdir / "pacs" / profile.site_id))
            upload = upload_folder(pacs.pacs_config, synth_dir / profile.site_id / "dicom")
            if not upload.ok:
                raise PacsError(f"upload to {profile.site_id}'s PACS incomplete: {upload}")
            logger.info("demo: %s: %d instances in its PACS", profile.site_id, upload.stored)
            configs.append(
                SiteDataConfig(
                    site_id=profile.site_id,
                    pacs=pacs.pacs_config,
                    data_root=workdir / "sites" / profile.site_id,
                    transport=TRANSPORTS[index % len(TRANSPORTS)],
                )
            )
        for pass_no in (1, 2):
            for cfg in configs:
                start = time.perf_counter()
                report = prepare_site(cfg, progress=progress)
                results.append(PassResult(pass_no, report, time.perf_counter() - start))
    return results


def run_federation(
    workdir: Path, reports: list[PrepareReport], *, rounds: int, strategy: str, seed: int, progress: bool
) -> SimulationResult:
    """Train a tiny U-Net federatedly over the sites' preprocessed cases."""
    folders = {r.site_id: Path(r.preprocessed_dir) for r in reports}
    sites = {site: SiteData.from_dir(folder, group=site) for site, folder in folders.items()}
    config = ExperimentConfig(
        name="demo",
        sites=tuple(sites),
        rounds=rounds,
        strategy=strategy,
        train=TrainConfig(size="tiny", epochs=2, batch_size=2, lr=3e-3, seed=seed),
        seed=seed,
    )
    # One folder per setting: a stored experiment's config is immutable, a re-run with it resumes.
    return simulate(
        sites, config, workdir / "federation" / f"{strategy}-r{rounds}-s{seed}", progress=progress
    )


def format_table(results: list[PassResult]) -> str:
    """A plain-text table: one row per site and pass."""
    header = (
        "pass",
        "site",
        "transport",
        "cases",
        "series fetched/cached/failed",
        "converted/cached/skipped",
        "preprocessed/cached/failed",
        "ready",
        "seconds",
    )
    rows = [header]
    for result in results:
        r = result.report
        rows.append(
            (
                str(result.pass_no),
                r.site_id,
                r.transport,
                str(r.cohort_cases),
                f"{r.fetched}/{r.fetch_cached}/{len(r.fetch_failed)}",
                f"{r.converted}/{r.convert_cached}/{len(r.convert_skipped)}",
                f"{r.preprocessed}/{r.preprocess_cached}/{len(r.preprocess_failed)}",
                f"{r.ready_cases}/{r.cohort_cases}",
                f"{result.seconds:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    problems = [
        f"  {r.report.site_id} (pass {r.pass_no}): {key}: {reason}"
        for r in results
        for key, reason in (*r.report.fetch_failed, *r.report.convert_skipped, *r.report.preprocess_failed)
    ]
    if problems:
        lines += ["", "Not ready:", *problems]
    return "\n".join(lines)
