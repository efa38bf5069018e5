"""``jipfed pacs``: upload DICOM to a PACS over STOW-RS, or run a local Orthanc PACS.

    jipfed pacs upload --url http://127.0.0.1:8042/dicom-web [--user U [--password P]] DIR
    jipfed pacs serve --dir DIR [--upload SRC] [--http-port N] [--dicom-port N]

``upload`` asks for the password when ``--user`` is given without ``--password``.
``serve`` keeps Orthanc's storage in DIR (so a later ``serve --dir DIR`` has the same data) and runs
until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import signal
import threading
from pathlib import Path
from types import FrameType

from jipfed.imaging.dicomweb import upload_folder
from jipfed.imaging.pacs import PacsConfig, PacsError
from jipfed.local.orthanc import OrthancError, OrthancServer

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``pacs`` with its ``upload`` and ``serve`` sub-commands."""
    parser = subparsers.add_parser(
        "pacs",
        help="run a local Orthanc PACS / upload DICOM over STOW-RS",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="pacs_command", required=True, metavar="ACTION")

    upload = actions.add_parser("upload", help="upload every DICOM file below DIR over STOW-RS")
    upload.add_argument("--url", required=True, help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    upload.add_argument("--user", help="HTTP basic-auth user")
    upload.add_argument("--password", help="its password (asked for when --user is given without it)")
    upload.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    upload.add_argument("dir", type=Path, help="folder searched recursively for DICOM files")

    serve = actions.add_parser("serve", help="run Orthanc with its data in DIR until Ctrl-C")
    serve.add_argument(
        "--dir", required=True, type=Path, help="Orthanc's working folder (config, storage, log)"
    )
    serve.add_argument("--upload", type=Path, help="upload the DICOM files below this folder once started")
    serve.add_argument("--user", default="jipfed", help="user to register (default jipfed)")
    serve.add_argument("--password", help="its password (default: a random one, printed)")
    serve.add_argument("--http-port", type=int, help="HTTP port (default: a free one)")
    serve.add_argument("--dicom-port", type=int, help="DICOM port (default: a free one)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the chosen action; returns the process exit code."""
    try:
        if args.pacs_command == "upload":
            return _upload(args)
        return _serve(args)
    except (PacsError, OrthancError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 1


def _upload(args: argparse.Namespace) -> int:
    password = args.password
    if args.user is not None and password is None:
        password = getpass.getpass(f"password for {args.user}: ")
    config = PacsConfig(dicomweb_url=args.url, username=args.user, password=password, timeout_s=args.timeout)
    report = upload_folder(config, args.dir)
    for uid, reason in report.failed:
        log.error("instance %s not stored: %s", uid, reason)
    return 0 if report.ok else 1


def _serve(args: argparse.Namespace) -> int:
    server = OrthancServer(
        args.dir,
        username=args.user,
        password=args.password,
        http_port=args.http_port,
        dicom_port=args.dicom_port,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    # SIGINT explicitly too: a process started in the background by a shell inherits SIGINT ignored
    # (Python then never raises KeyboardInterrupt), yet Ctrl-C / SIGINT to the group must stop it.
    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        if args.upload is not None:
            report = upload_folder(server.pacs_config, args.upload)
            if not report.ok:
                log.error("upload incomplete: %d of %d stored", report.stored, report.files)
        config = server.pacs_config
        log.info(
            "PACS ready: DICOMweb %s user %s password %s | DIMSE %s@%s:%s (calling AE %s must be used) | log %s",
            config.dicomweb_url,
            config.username,
            config.password,
            config.called_aet,
            config.dimse_host,
            config.dimse_port,
            config.calling_aet,
            server.log_path,
        )
        log.info("press Ctrl-C to stop")
        while not stop.wait(1.0):
            if not server.running:
                log.error("Orthanc exited unexpectedly; log:\n%s", server.log_tail())
                return 1
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
