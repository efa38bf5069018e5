"""``jipfed lines``: model lines in the central's store (nightly retraining, release rule, history).

    jipfed lines list --store STORE
    jipfed lines show glioma --store STORE                 definition and released version (JSON)
    jipfed lines create --store STORE --file glioma.json   a definition (see `jipfed lines schema`)
    jipfed lines create --store STORE --name glioma --sites site-a site-b [--schedule "0 2 * * *"]
    jipfed lines set glioma --store STORE --set replay=8 --set rule.site_tolerance=0.02
    jipfed lines versions glioma --store STORE             every version: status, date, parent, scores
    jipfed lines fetch-released glioma --store STORE --out model.safetensors
    jipfed lines schema                                    the JSON Schema of a definition

``--store`` is a folder or an s3:// URL (credentials from the environment, as for
``jipfed site-token``). ``fetch-released`` writes only the released version, never a rejected
candidate, after checking its sha256.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ACTIONS = ("list", "show", "create", "set", "versions", "fetch-released", "schema")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``lines`` and its options; ``run`` is set as the handler."""
    parser = subparsers.add_parser(
        "lines",
        help="model lines: list, show, create, set, versions, fetch-released",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("line", nargs="?", help="the line's name (show, set, versions, fetch-released)")
    parser.add_argument("--store", help="the central's model store (folder or s3:// URL)")
    parser.add_argument("--file", type=Path, help="create: a JSON line definition")
    parser.add_argument("--name", help="create: the line's name")
    parser.add_argument("--sites", nargs="+", help="create: the line's site ids")
    parser.add_argument("--schedule", help="create: cron expression (UTC), default nightly 02:00")
    parser.add_argument(
        "--set",
        dest="changes",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="set: a change, e.g. replay=8, paused=true, rule.site_tolerance=0.02, experiment.train={...}",
    )
    parser.add_argument("--out", type=Path, help="fetch-released: where to write the model")
    parser.set_defaults(run=run)
    return parser


def parse_changes(changes: list[str]) -> dict[str, Any]:
    """``["replay=8", "rule.metric=\\"accuracy\\""]`` → ``{"replay": 8, "rule": {"metric": "accuracy"}}``.

    Values are JSON; a value that is not JSON is taken as a string.
    """
    result: dict[str, Any] = {}
    for change in changes:
        key, sep, text = change.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {change!r}: expected KEY=VALUE")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        head, dot, tail = key.partition(".")
        if dot:
            result.setdefault(head, {})[tail] = value
        else:
            result[head] = value
    return result


def run(args: argparse.Namespace) -> int:
    from jipfed.lines.definition import LINE_SCHEMA

    if args.action == "schema":
        print(json.dumps(LINE_SCHEMA, indent=2))
        return 0
    if not args.store:
        raise SystemExit(f"jipfed lines {args.action}: --store is required")
    from jipfed.storage.factory import open_store

    store = open_store(args.store)
    try:
        return _ACTIONS[args.action](store, args)
    except (KeyError, ValueError) as exc:
        raise SystemExit(f"jipfed lines {args.action}: {exc.args[0] if exc.args else exc}") from None


def _need_line(args: argparse.Namespace) -> str:
    if not args.line:
        raise SystemExit(f"jipfed lines {args.action}: name the line")
    return str(args.line)


def _list(store: Any, args: argparse.Namespace) -> int:
    from jipfed.lines.store import LineStore, list_lines

    for name in list_lines(store):
        lines = LineStore(store, name)
        released = lines.released()
        line = lines.load()
        print(
            f"{name}\tsites={','.join(line.sites)}\tschedule={line.schedule!r}\t"
            f"released={released['version'] if released else '-'}\tversions={len(lines.versions())}"
            + ("\tpaused" if line.paused else "")
        )
    return 0


def _show(store: Any, args: argparse.Namespace) -> int:
    from jipfed.lines.store import LineStore

    lines = LineStore(store, _need_line(args))
    print(
        json.dumps(
            {"line": lines.load().to_dict(), "released": lines.released(), "watermarks": lines.watermarks()},
            indent=2,
        )
    )
    return 0


def _create(store: Any, args: argparse.Namespace) -> int:
    from jipfed.lines.definition import LineConfig
    from jipfed.lines.store import LineStore

    if args.file:
        data = json.loads(args.file.read_text())
    elif args.name and args.sites:
        data = {"name": args.name, "sites": args.sites}
        if args.schedule:
            data["schedule"] = args.schedule
    else:
        raise SystemExit("jipfed lines create: give --file, or --name and --sites")
    line = LineConfig.from_dict(data)
    LineStore(store, line.name).save(line, create=True)
    print(f"line {line.name} created")
    return 0


def _set(store: Any, args: argparse.Namespace) -> int:
    from jipfed.lines.store import LineStore

    lines = LineStore(store, _need_line(args))
    if not args.changes:
        raise SystemExit("jipfed lines set: give at least one --set KEY=VALUE")
    line = lines.load().updated(parse_changes(args.changes))
    lines.save(line, create=False)
    print(json.dumps(line.to_dict(), indent=2))
    return 0


def _versions(store: Any, args: argparse.Namespace) -> int:
    from jipfed.lines.store import LineStore

    lines = LineStore(store, _need_line(args))
    metric = lines.load().rule.metric
    released = (lines.released() or {}).get("version")
    print(f"version\tstatus\tdate\tparent\tcases\t{metric}\tparent's\tverdict")
    for v in lines.versions():
        weighted = v["evaluation"].get("weighted", {})
        cand = weighted.get("candidate", {}).get(metric)
        prev = weighted.get("released", {}).get(metric)
        print(
            "\t".join(
                [
                    v["version"] + (" *" if v["version"] == released else ""),
                    v["status"],
                    v["date"],
                    v.get("parent") or "-",
                    str(sum(v["trained"]["n_samples"].values())),
                    "-" if cand is None else f"{cand:.4f}",
                    "-" if prev is None else f"{prev:.4f}",
                    "; ".join(v["verdict"]["reasons"]),
                ]
            )
        )
    return 0


def _fetch_released(store: Any, args: argparse.Namespace) -> int:
    from jipfed.lines.store import LineStore

    if not args.out:
        raise SystemExit("jipfed lines fetch-released: --out is required")
    version, payload, manifest = LineStore(store, _need_line(args)).released_model()
    args.out.write_bytes(payload)
    args.out.with_suffix(".json").write_text(json.dumps(manifest, indent=2))
    print(f"{args.line} {version} ({manifest.get('sha256')}) written to {args.out}")
    return 0


_ACTIONS = {
    "list": _list,
    "show": _show,
    "create": _create,
    "set": _set,
    "versions": _versions,
    "fetch-released": _fetch_released,
}
