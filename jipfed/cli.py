"""The ``jipfed`` command line: ``jipfed <command> --help`` documents each command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: command name -> module exposing ``add_parser(subparsers)`` and ``run(args) -> int``.
COMMANDS: dict[str, str] = {
    "synth": "jipfed.commands.synth",
    "pacs": "jipfed.commands.pacs",
    "prepare": "jipfed.commands.prepare",
    "demo": "jipfed.commands.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jipfed", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
