"""``jipfed site-token``: issue, rotate or revoke a site's credential for the central endpoint (central admin).

    jipfed site-token --store STORE --site site-a [--days 90] [--public-key site-a.pub]
    jipfed site-token --store STORE --revoke site-a

Issuing writes the site's record (key id, expiry, optional Ed25519 public key) to the credential
registry ``credentials/<site>.json`` of the central's model store and prints the token and the
central's public key (the site pins it to verify the models it downloads). Issuing again rotates
the site's key: its previous token stops working, no other site is touched. ``--revoke`` refuses
the site's token from now on. ``--legacy`` prints a never-expiring format-1 token without a record.

The secret (``[jipfed] site_token_secret`` of the central's Airflow) comes from ``--secret-file`` or
``$JIPFED_SITE_TOKEN_SECRET``, never from the command line. ``--store`` is a folder or an
``s3://bucket/prefix?endpoint=...`` URL; S3 credentials come from ``$AWS_ACCESS_KEY_ID`` and
``$AWS_SECRET_ACCESS_KEY``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from jipfed.central.tokens import site_token

SECRET_ENV = "JIPFED_SITE_TOKEN_SECRET"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``site-token`` and its options; ``run`` is set as the handler."""
    parser = subparsers.add_parser(
        "site-token",
        help="issue, rotate or revoke a site's token for the central endpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--site", help="issue (or rotate) the token of this site id")
    action.add_argument("--revoke", metavar="SITE", help="revoke this site's credential")
    parser.add_argument(
        "--store", help="the central's model store (folder or s3:// URL) holding the registry"
    )
    parser.add_argument(
        "--days", type=float, default=90.0, help="validity of a new token in days (default 90)"
    )
    parser.add_argument("--public-key", type=Path, help="the site's Ed25519 public key (PEM or base64)")
    parser.add_argument(
        "--legacy", action="store_true", help="print a never-expiring format-1 token (no record)"
    )
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


def _open_registry_store(url: str | None):  # noqa: ANN202 - a ModelStore
    from jipfed.storage.factory import open_store

    if not url:
        raise ValueError("--store is required: the credential registry lives in the central's model store")
    if url.startswith("s3://"):
        return open_store(
            url,
            access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        )
    return open_store(url)


def run(args: argparse.Namespace) -> int:
    from jipfed.central.credentials import issue_credential, revoke_credential
    from jipfed.central.model_signing import central_public_key
    from jipfed.federation.signing import load_public_key

    try:
        if args.legacy:
            if args.site is None:
                raise ValueError("--legacy issues a token; it cannot revoke one")
            print(site_token(read_secret(args.secret_file), args.site))
            return 0
        store = _open_registry_store(args.store)
        if args.revoke is not None:
            record = revoke_credential(store, args.revoke)
            print(f"revoked the credential of site {record.site!r} (key {record.key_id})")
            return 0
        secret = read_secret(args.secret_file)
        public_key = load_public_key(args.public_key.read_bytes()) if args.public_key else None
        token, record = issue_credential(store, secret, args.site, days=args.days, public_key=public_key)
    except (OSError, ValueError) as exc:
        print(f"jipfed site-token: {exc}", file=sys.stderr)
        return 2
    print(token)
    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.expires_at))
    print(f"site {record.site}: key {record.key_id}, expires {expiry}", file=sys.stderr)
    print(f"central public key (pin it at the site): {central_public_key(secret)}", file=sys.stderr)
    return 0
