"""``jipfed site-key``: make a site's Ed25519 signing key (site admin, once).

    jipfed site-key --out /data/jipfed/keys/site-a.pem

Writes the private key (PEM, mode 0600; it never leaves the site) and prints the public key in
base64: hand that to the central admin for ``jipfed site-token --site site-a --public-key ...``.
Then set the extra ``signing_key_file`` of the site's central Connection to the PEM's path (and
``central_public_key`` to the key ``jipfed site-token`` printed), so that every update is signed
and every global model verified before training.
"""

from __future__ import annotations

import argparse
import base64
import os
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``site-key`` and its options; ``run`` is set as the handler."""
    parser = subparsers.add_parser(
        "site-key",
        help="make a site's Ed25519 signing key; prints the public key for the central",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write the private key (PEM)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from jipfed.federation.signing import generate_private_key, private_key_pem, public_key_raw

    out: Path = args.out
    if out.exists():
        raise SystemExit(f"{out} exists: a site key is made once (move it away to make a new one)")
    key = generate_private_key()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_key_pem(key))
    print(base64.b64encode(public_key_raw(key)).decode("ascii"))
    return 0
