"""``jipfed prepare``: run a site's data pipeline (cohort → fetch → convert → preprocess) once.

The password may come from the environment variable ``JIPFED_PACS_PASSWORD`` instead of the
command line (where other users of the machine can see it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from jipfed.imaging.pacs import PacsConfig, PacsError
from jipfed.imaging.pipeline import DEFAULT_DATASET, TRANSPORTS, SiteDataConfig, prepare_site
from jipfed.imaging.preprocess import PreprocessConfig

logger = logging.getLogger(__name__)

PASSWORD_ENV = "JIPFED_PACS_PASSWORD"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``prepare`` and its options."""
    parser = subparsers.add_parser(
        "prepare",
        help="site data pipeline: cohort, fetch, convert, preprocess",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--site-id", required=True, help="this site's id (logs and reports)")
    parser.add_argument(
        "--dicomweb-url", required=True, help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web"
    )
    parser.add_argument("--user", help="PACS user (HTTP basic auth); omit for none")
    parser.add_argument("--password", help=f"PACS password (default: ${PASSWORD_ENV})")
    parser.add_argument("--dimse-host", default="127.0.0.1", help="DIMSE host (default %(default)s)")
    parser.add_argument("--dimse-port", type=int, help="DIMSE port; needed for --transport cget")
    parser.add_argument("--called-aet", default="ORTHANC", help="the PACS's AE title (default %(default)s)")
    parser.add_argument("--calling-aet", default="JIPFED", help="our AE title (default %(default)s)")
    parser.add_argument("--data-root", required=True, type=Path, help="the site's local data folder")
    parser.add_argument(
        "--dataset", default=DEFAULT_DATASET, help="StudyDescription of the cohort (default %(default)s)"
    )
    parser.add_argument(
        "--transport", choices=TRANSPORTS, default="dicomweb", help="fetch over (default %(default)s)"
    )
    defaults = PreprocessConfig()
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar="MM",
        default=list(defaults.spacing_mm),
        help="target voxel size X Y Z in mm (default %(default)s)",
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=3,
        metavar="N",
        default=list(defaults.spatial_size),
        help="output shape X Y Z in voxels (default %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)
    return parser


def config_from_args(args: argparse.Namespace) -> SiteDataConfig:
    """Build the site config; ValueError for inconsistent options."""
    if args.user is None:
        if args.password is not None:
            raise ValueError("--password given without --user")
        password = None  # no auth: an exported $JIPFED_PACS_PASSWORD is not used
    else:
        password = args.password if args.password is not None else os.environ.get(PASSWORD_ENV)
        if password is None:
            raise ValueError(f"--user needs --password or ${PASSWORD_ENV}")
    pacs = PacsConfig(
        dicomweb_url=args.dicomweb_url,
        username=args.user,
        password=password,
        dimse_host=args.dimse_host,
        dimse_port=args.dimse_port,
        called_aet=args.called_aet,
        calling_aet=args.calling_aet,
    )
    return SiteDataConfig(
        site_id=args.site_id,
        pacs=pacs,
        data_root=args.data_root,
        dataset=args.dataset,
        transport=args.transport,
        preprocess=PreprocessConfig(spacing_mm=tuple(args.spacing), spatial_size=tuple(args.size)),
    )


def run(args: argparse.Namespace) -> int:
    """0 when every cohort case is preprocessed, 1 when some are not, 2 on a configuration or PACS error."""
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        logger.error("prepare: %s", err)
        return 2
    try:
        report = prepare_site(cfg, progress=not args.no_progress)
    except PacsError as err:
        logger.error("prepare: %s", err)
        return 2
    logger.info("prepare: %s", json.dumps(report.to_dict(), indent=2))
    if report.ready_cases < report.cohort_cases:
        logger.warning(
            "prepare: %d of %d cohort case(s) ready; see the report under %s/reports",
            report.ready_cases,
            report.cohort_cases,
            cfg.data_root,
        )
        return 1
    return 0
