"""Stage the Docker build contexts of the images (no Docker engine needed; `docker build` them).

    python -m jipfed.packaging.context worker --out build/worker [--wheels DIR]
    python -m jipfed.packaging.context installer --out build/installer
    python -m jipfed.packaging.context airflow --out build/airflow [--wheels DIR]

``--wheels DIR`` adds every wheel in DIR to the context (for ``--build-arg OFFLINE=1``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from jipfed.packaging import source_root
from jipfed.packaging.sources import base_requirements, build_wheel, drop, link_or_copy, locked, select

IMAGES = ("worker", "installer", "airflow")
#: Every DAG the suite ships (central, site, nightly ...); nothing else in dags/ is a DAG.
DAG_PATTERN = "jipfed_*.py"
#: Installed by the worker Dockerfile itself, from the index its TORCH_VARIANT chooses.
TORCH_PROJECTS = ("torch",)
#: Airflow imports every .py file in its plugins folder; this one file registers our plugin and the
#: package itself is hidden from that scan by an .airflowignore (regexp: everything below jipfed/).
PLUGIN_ENTRY = '"""Registers the JIP Federated Airflow plugin (the jipfed package is beside this file)."""\n\nfrom jipfed.plugins.jipfed_plugin import JipfedPlugin  # noqa: F401\n'
PLUGIN_IGNORE = "# the jipfed package: imported by the DAGs, not scanned for plugins (see ../jipfed_airflow_plugin.py)\n.*\n"


def _requirements(path: Path, lines: list[str], origin: str) -> None:
    path.write_text(f"# Pinned from {origin} by jipfed.packaging.context.\n" + "".join(f"{line}\n" for line in lines))


def _copy_dags(out: Path) -> None:
    for path in sorted((source_root() / "dags").glob(DAG_PATTERN)):
        link_or_copy(path, out / "dags" / path.name)


def _wheels(out: Path, jipfed_wheel: Path, extra: Path | None) -> None:
    link_or_copy(jipfed_wheel, out / "wheels" / jipfed_wheel.name)
    for wheel in sorted(extra.glob("*.whl")) if extra else []:
        link_or_copy(wheel, out / "wheels" / wheel.name)


def _unpack_package(wheel: Path, plugins: Path) -> None:
    """The wheel's packages (jipfed, with operators and plugins inside) into the plugins folder."""
    with zipfile.ZipFile(wheel) as archive:
        members = [n for n in archive.namelist() if n.startswith("jipfed/")]
        archive.extractall(plugins, members=members)
    (plugins / "jipfed" / ".airflowignore").write_text(PLUGIN_IGNORE)
    (plugins / "jipfed_airflow_plugin.py").write_text(PLUGIN_ENTRY)


def stage(image: str, out: Path, jipfed_wheel: Path, wheels: Path | None = None) -> Path:
    """Write the build context of ``image`` to ``out`` (emptied first); returns ``out``."""
    if image not in IMAGES:
        raise ValueError(f"unknown image {image!r}; known: {', '.join(IMAGES)}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy2(source_root() / "containers" / image / "Dockerfile", out / "Dockerfile")
    if image == "worker":
        _requirements(out / "requirements.txt", drop(locked("worker"), TORCH_PROJECTS), "requirements/worker.txt")
        _wheels(out, jipfed_wheel, wheels)
    elif image == "airflow":
        pins = select(locked("scheduler"), base_requirements(jipfed_wheel))
        _requirements(out / "requirements.txt", pins, "requirements/scheduler.txt (the suite's own dependencies)")
        _wheels(out, jipfed_wheel, wheels)
        _copy_dags(out)
    else:
        _copy_dags(out)
        _unpack_package(jipfed_wheel, out / "plugins")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jipfed.packaging.context", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", choices=IMAGES)
    parser.add_argument("--out", type=Path, required=True, help="the context folder (replaced)")
    parser.add_argument("--wheels", type=Path, help="a folder of wheels to add (offline image builds)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="jipfed-context-") as tmp:
        try:
            print(stage(args.image, args.out, build_wheel(Path(tmp)), args.wheels))
        except (ValueError, RuntimeError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
