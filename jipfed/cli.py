"""The ``jipfed`` command line: ``jipfed <command> --help`` documents each command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: command name -> (module exposing ``add_parser(subparsers)`` and ``run(args) -> int``, one-line help).
#: Only the chosen command's module is imported, so ``jipfed synth`` never pays for torch or Airflow.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("jipfed.commands.synth", "write a synthetic BraTS-like multi-site DICOM data set"),
    "pacs": ("jipfed.commands.pacs", "run a local Orthanc PACS / upload DICOM over STOW-RS"),
    "prepare": ("jipfed.commands.prepare", "site data pipeline: cohort, fetch, convert, preprocess"),
    "simulate": ("jipfed.commands.simulate", "run a federated experiment with N sites in one process"),
    "demo": ("jipfed.commands.demo", "federated demo: 3 sites with their own PACS, rounds run by Airflow"),
    "pipeline-demo": (
        "jipfed.commands.pipeline_demo",
        "site data pipeline demo on 3 PACS, then in-process FL",
    ),
    "site-token": ("jipfed.commands.site_token", "print a site's token for the central endpoint"),
    "site-key": ("jipfed.commands.site_key", "make a site's Ed25519 signing key (prints the public key)"),
    "task": ("jipfed.commands.task", "run one heavy DAG step (a pod's entry point), configured by the environment"),
    "lines": ("jipfed.commands.lines", "model lines: list, show, create, set, versions, fetch-released"),
}

#: Libraries that log routine detail at INFO (highdicom: every copied module); shown with -v only.
QUIET_LIBRARIES = ("highdicom", "dicomweb_client", "pynetdicom", "urllib3", "werkzeug")


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """Parser with every command listed; only ``chosen`` gets its full argument set."""
    parser = argparse.ArgumentParser(prog="jipfed", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if name == chosen:
            importlib.import_module(module_name).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((arg for arg in argv if arg in COMMANDS), None)
    args = build_parser(chosen).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        for name in QUIET_LIBRARIES:
            logging.getLogger(name).setLevel(logging.WARNING)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
