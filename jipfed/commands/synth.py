"""``jipfed synth``: write a synthetic BraTS-like multi-site DICOM data set (see jipfed.imaging.synth)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from jipfed.imaging.synth import ORIENTATIONS, default_site_profiles, write_dataset

logger = logging.getLogger(__name__)

MIXED = "mixed"
#: Orientations cycled over the sites by ``--orientation mixed``.
MIXED_ORIENTATIONS = ("axial", "sagittal", "oblique")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``synth`` and its options; ``run`` is set as the handler."""
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic BraTS-like multi-site DICOM data set",
        description=(
            "Write <out>/<site>/dicom/<case>/<SERIES>/*.dcm (FLAIR, T1, T1c, T2, SEG), "
            "<out>/<site>/truth/<case>.npz (never for the PACS) and <out>/dataset.json."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    parser.add_argument(
        "--cases",
        type=int,
        default=8,
        help="cases per site; heterogeneous sites split sites x cases unequally (default 8)",
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=3,
        default=[64, 64, 40],
        metavar=("ROWS", "COLS", "SLICES"),
        help="volume size (default 64 64 40)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--homogeneous", action="store_true", help="identical scanner/population profiles")
    parser.add_argument(
        "--orientation",
        choices=(*ORIENTATIONS, MIXED),
        default="axial",
        help=f"slice orientation of every site, or '{MIXED}' to cycle {', '.join(MIXED_ORIENTATIONS)}",
    )
    parser.add_argument(
        "--study-description", default="BRATS-SYNTH", help="StudyDescription, the data set tag"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the data set; return 0, or 2 for invalid options."""
    orientations = MIXED_ORIENTATIONS if args.orientation == MIXED else (args.orientation,)
    started = time.perf_counter()
    try:
        profiles = default_site_profiles(
            args.sites, args.cases, heterogeneous=not args.homogeneous, orientations=orientations
        )
        manifest = write_dataset(
            args.out,
            profiles,
            shape=tuple(args.size),
            seed=args.seed,
            study_description=args.study_description,
            progress=not args.no_progress,
        )
    except ValueError as exc:
        logger.error("synth: %s", exc)
        return 2
    for site in manifest.sites:
        grades = [case.grade for case in site.cases]
        logger.info(
            "%s: %d cases (%d HGG, %d LGG), %s, spacing %s x %s mm",
            site.site_id,
            len(grades),
            grades.count("HGG"),
            grades.count("LGG"),
            site.profile.orientation,
            "x".join(f"{s:g}" for s in site.profile.pixel_spacing_mm),
            f"{site.profile.slice_thickness_mm:g}",
        )
    logger.info("done in %.1f s: %s", time.perf_counter() - started, args.out)
    return 0
