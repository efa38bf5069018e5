"""``jipfed site-token``: print a site's bearer token for the central endpoint (central admin only).

The token is derived from the central's secret (``[jipfed] site_token_secret`` of the central's
Airflow), read from ``--secret-file`` or the environment variable ``JIPFED_SITE_TOKEN_SECRET``,
never from the command line (it would end up in the shell history). Hand the printed token to the
site; it goes into the password of the site's Connection ``jipfed_central_default``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jipfed.central.tokens import site_token

SECRET_ENV = "JIPFED_SITE_TOKEN_SECRET"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``site-token`` and its options; ``run`` is set as the handler."""
    parser = subparsers.add_parser(
        "site-token",
        help="print a site's token for the central endpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--site", required=True, help="site id (letters, digits, '_' and '-')")
    parser.add_argument(
        "--secret-file",
        type=Path,
        help=f"file holding the central's site token secret (default: environment variable {SECRET_ENV})",
    )
    parser.set_defaults(run=run)
    return parser


def read_secret(secret_file: Path | None) -> str:
    """The secret from ``secret_file`` (surrounding whitespace stripped) or ``$JIPFED_SITE_TOKEN_SECRET``."""
    if secret_file is not None:
        return secret_file.read_text(encoding="utf-8").strip()
    secret = os.environ.get(SECRET_ENV, "").strip()
    if not secret:
        raise ValueError(f"no secret: pass --secret-file or set {SECRET_ENV}")
    return secret


def run(args: argparse.Namespace) -> int:
    try:
        token = site_token(read_secret(args.secret_file), args.site)
    except (OSError, ValueError) as exc:
        print(f"jipfed site-token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0
