"""The offline bundle: everything an air-gapped site needs, with a sha256 manifest.

    python -m jipfed.packaging.bundle build --out dist/bundle [--set core|scheduler|worker ...]
        [--without-torch] [--torch-index-url URL]
        [--python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64]
        [--dag-installer-chart PATH]
    python -m jipfed.packaging.bundle verify dist/bundle

Layout of the bundle::

    wheels/            the suite's wheel and the pinned wheels of the chosen sets (pip --no-index)
    requirements/      <set>.txt: what each set pins (install with -r)
    charts/            the Kaapana extension charts (.tgz, with Kaapana's dag-installer-chart inside)
    images/<image>/    Docker build contexts: worker, installer, airflow (wheels included, OFFLINE=1)
    helm/airflow-values/central.yaml, docs/deployment.md
    bundle.json        what was bundled;   SHA256SUMS   sha256 of every file (`sha256sum -c` works too)

Sets: ``core`` = the suite and its own dependencies (an existing Airflow, e.g. Kaapana's);
``scheduler`` = requirements/scheduler.txt (Airflow 2.11 + the Kubernetes provider + the suite's
light dependencies); ``worker`` = requirements/worker.txt (torch, MONAI, the DICOM stack; torch from
``--torch-index-url``, PyPI's CUDA build by default; ``--without-torch`` leaves torch out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from jipfed.packaging import source_root
from jipfed.packaging.charts import CHARTS, DAG_INSTALLER, package_charts
from jipfed.packaging.context import IMAGES, TORCH_PROJECTS, stage
from jipfed.packaging.manifest import verify_manifest, write_manifest
from jipfed.packaging.sources import build_wheel, canonical, drop, link_or_copy, locked, pin_name

SETS = ("core", "scheduler", "worker")
EXTRA_FILES = ("helm/airflow-values/central.yaml", "docs/deployment.md")


@dataclass(frozen=True)
class Target:
    """The interpreter and platform the wheels are for (None: this one)."""

    python_version: str | None = None
    platforms: tuple[str, ...] = ()

    def pip_args(self) -> list[str]:
        if not (self.python_version or self.platforms):
            return []
        args = ["--only-binary=:all:", "--implementation", "cp"]
        if self.python_version:
            args += ["--python-version", self.python_version]
        for platform in self.platforms:
            args += ["--platform", platform]
        return args


def _pip(args: list[str], what: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip could not fetch {what}:\n{result.stderr[-4000:]}")


def fetch(requirements: list[str], wheels: Path, target: Target, what: str, *,
          deps: bool = False, extra: list[str] | None = None) -> None:
    """Wheels of ``requirements`` into ``wheels``: built from sdists when needed (this platform),
    binary only for another target. The lock files are complete, so no dependency resolution."""
    if not requirements:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as req:
        req.write("".join(f"{line}\n" for line in requirements))
        req.flush()
        if target.pip_args():
            args = ["download", "--quiet", "--dest", str(wheels), *target.pip_args()]
        else:
            args = ["wheel", "--quiet", "--wheel-dir", str(wheels)]
        args += ([] if deps else ["--no-deps"]) + (extra or []) + ["-r", req.name]
        _pip(args, what)


def _wheel_pins(wheels: Path) -> list[str]:
    """``name==version`` of every wheel in the folder (the ``core`` set's resolution)."""
    pins = []
    for wheel in sorted(wheels.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        pins.append(f"{canonical(name)}=={version}")
    return pins


def default_dag_installer() -> Path:
    """Kaapana's dag-installer-chart where our charts' requirements.yaml points (a Kaapana checkout)."""
    chart = source_root() / "helm" / CHARTS[0]
    (dependency,) = yaml.safe_load((chart / "requirements.yaml").read_text())["dependencies"]
    return (chart / dependency["repository"].removeprefix("file://")).resolve()


def build(out: Path, sets: list[str], *, target: Target, without_torch: bool = False,
          torch_index_url: str | None = None, dag_installer: Path | None = None) -> Path:
    """Write the bundle to ``out`` (which must not exist); returns ``out``."""
    dag_installer = dag_installer or default_dag_installer()
    if not (dag_installer / "Chart.yaml").is_file():
        raise ValueError(
            f"Kaapana's {DAG_INSTALLER} is not at {dag_installer}: pass --dag-installer-chart "
            f"<kaapana source>/services/utils/{DAG_INSTALLER}"
        )
    if out.exists():
        raise ValueError(f"{out} exists: choose a new folder (a bundle is written once, then verified)")
    wheels = out / "wheels"
    (out / "requirements").mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="jipfed-bundle-") as tmp:
        work = Path(tmp)
        jipfed_wheel = build_wheel(wheels)
        set_wheels: dict[str, Path] = {}
        for name in sets:
            folder = work / f"wheels-{name}"
            if name == "core":
                fetch([str(jipfed_wheel)], folder, target, "the core set", deps=True,
                      extra=["-c", str(source_root() / "requirements" / "scheduler.txt")])
                pins = [p for p in _wheel_pins(folder) if pin_name(p) != "jip-federated"]
            else:
                pins = locked(name)
                torch = [p for p in pins if pin_name(p) in TORCH_PROJECTS]
                pins = drop(pins, TORCH_PROJECTS)
                fetch(pins, folder, target, f"the {name} set")
                if torch and not without_torch:
                    index = ["--index-url", torch_index_url] if torch_index_url else []
                    fetch(torch, folder, target, "torch", deps=True, extra=index)
                    pins += torch
            (out / "requirements" / f"{name}.txt").write_text("".join(f"{p}\n" for p in pins))
            for wheel in folder.glob("*.whl"):  # hard links: the image contexts share these files
                link_or_copy(wheel, wheels / wheel.name)
            set_wheels[name] = folder
        package_charts(dag_installer, out / "charts", work / "charts")
        image_wheels = {"worker": set_wheels.get("worker"), "airflow": set_wheels.get("core")}
        for image in IMAGES:
            stage(image, out / "images" / image, jipfed_wheel, image_wheels.get(image))
    for name in EXTRA_FILES:
        if (source_root() / name).is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source_root() / name, out / name)
    info = {
        "suite": jipfed_wheel.name,
        "sets": sets,
        "torch": None if without_torch or "worker" not in sets else (torch_index_url or "PyPI (CUDA build)"),
        "python_version": target.python_version or f"{sys.version_info.major}.{sys.version_info.minor}",
        "platforms": list(target.platforms) or "this machine's",
        "dag_installer_chart": str(dag_installer.resolve()),
    }
    (out / "bundle.json").write_text(json.dumps(info, indent=2) + "\n")
    write_manifest(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jipfed.packaging.bundle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="build a bundle")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--set", dest="sets", action="append", choices=SETS,
                      help="a set to bundle (repeatable; default: scheduler and worker)")
    make.add_argument("--without-torch", action="store_true", help="leave torch out of the worker set")
    make.add_argument("--torch-index-url", help="where torch comes from (e.g. the PyTorch CPU index)")
    make.add_argument("--python-version", help="target Python, e.g. 3.12 (default: this one)")
    make.add_argument("--platform", dest="platforms", action="append", default=[],
                      help="target platform tag, repeatable: pip does not add older manylinux tags itself")
    make.add_argument("--dag-installer-chart", type=Path, help=f"Kaapana's {DAG_INSTALLER} folder")
    check = commands.add_parser("verify", help="check every file against SHA256SUMS")
    check.add_argument("bundle", type=Path)
    args = parser.parse_args(argv)
    if args.command == "verify":
        problems = verify_manifest(args.bundle)
        for problem in problems:
            print(f"{args.bundle}: {problem}", file=sys.stderr)
        print(f"{args.bundle}: {'FAILED' if problems else 'OK'}")
        return 1 if problems else 0
    try:
        out = build(args.out, args.sets or ["scheduler", "worker"],
                    target=Target(args.python_version, tuple(args.platforms)), without_torch=args.without_torch,
                    torch_index_url=args.torch_index_url, dag_installer=args.dag_installer_chart)
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
