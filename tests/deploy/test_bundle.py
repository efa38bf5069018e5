"""The offline bundle: build one (the ``core`` set: the suite and its own dependencies), install it
into a fresh venv with ``pip --no-index`` from the bundle alone, run the CLI and parse the DAGs there,
and check that the checksum manifest catches a tampered file.

The DagBag needs Airflow, which the ``core`` set leaves to the Airflow already running (Kaapana's):
the fresh venv sees Airflow 2.11 through a .pth naming .venv-af2's site-packages (its .pth files, the
editable install of this checkout among them, are not processed), and torch, MONAI, pydicom and
nibabel are blocked, as in a scheduler image without them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.conftest import AF2_PYTHON, airflow_env, isolated_env

pytestmark = pytest.mark.slow

FIXTURE_INSTALLER = Path(__file__).parent / "fixtures" / "dag-installer-chart"
HEAVY = ("torch", "monai", "pydicom", "nibabel")
DAGBAG_SCRIPT = """
import importlib.abc, json, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {heavy!r}:
            raise ImportError(f"{{name}} is not installed in a scheduler image")
sys.meta_path.insert(0, Blocked())
import jipfed
from airflow.models import DagBag
bag = DagBag(dag_folder={dags!r}, include_examples=False)
print(json.dumps({{"errors": bag.import_errors, "dags": sorted(bag.dag_ids), "jipfed": jipfed.__file__}}))
"""


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    result = run([sys.executable, "-m", "jipfed.packaging.bundle", "build", "--out", str(out), "--set", "core",
                  "--dag-installer-chart", str(FIXTURE_INSTALLER)])
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_bundle_has_wheels_charts_contexts_and_manifest(bundle: Path) -> None:
    names = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert any(n.startswith("wheels/jip_federated-") for n in names)
    assert {"charts/jipfed-site-workflow-0.1.0.tgz", "charts/jipfed-central-workflow-0.1.0.tgz"} <= names
    assert {"images/worker/Dockerfile", "images/installer/Dockerfile", "images/airflow/Dockerfile",
            "requirements/core.txt", "bundle.json", "SHA256SUMS"} <= names
    listed = {line.split("  ", 1)[1] for line in (bundle / "SHA256SUMS").read_text().splitlines()}
    assert listed == names - {"SHA256SUMS"}
    airflow_wheels = {p.name for p in (bundle / "images" / "airflow" / "wheels").glob("*.whl")}
    assert airflow_wheels == {p.name for p in (bundle / "wheels").glob("*.whl")}, "the airflow image builds offline"


@pytest.fixture(scope="module")
def fresh_venv(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with the bundle's wheels installed by pip from the bundle alone."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    assert run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    install = run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-index", "--find-links",
                   str(bundle / "wheels"), "-r", str(bundle / "requirements" / "core.txt"), "jip-federated"],
                  env=isolated_env())
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    return venv


@pytest.fixture(scope="module")
def dagbag(bundle: Path, fresh_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """DagBag of the bundle's DAG files in the fresh venv, Airflow 2.11 beside it, torch & co. blocked."""
    python = fresh_venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run([str(python), "-c", purelib]).stdout.strip())
    (site / "zz_airflow_2_11.pth").write_text(run([str(AF2_PYTHON), "-c", purelib]).stdout.strip() + "\n")
    work = tmp_path_factory.mktemp("airflow")
    env = airflow_env(work)
    dags = bundle / "images" / "installer" / "dags"
    parse = run([str(python), "-c", DAGBAG_SCRIPT.format(heavy=HEAVY, dags=str(dags))], env=env, cwd=work)
    assert parse.returncode == 0, parse.stderr[-4000:]
    report = json.loads(parse.stdout.strip().splitlines()[-1])
    assert report["jipfed"].startswith(str(site)), "the suite must come from the bundle's wheel"
    return {**report, "errors": {Path(path).name: error for path, error in report["errors"].items()}}


def test_installs_without_an_index(fresh_venv: Path) -> None:
    assert run([str(fresh_venv / "bin" / "python"), "-m", "pip", "check"], env=isolated_env()).returncode == 0
    cli = run([str(fresh_venv / "bin" / "jipfed"), "--help"], env=isolated_env())
    assert cli.returncode == 0 and "site-token" in cli.stdout, cli.stderr


def test_site_dags_parse_without_torch(dagbag: dict[str, object]) -> None:
    errors = dagbag["errors"]
    assert "jipfed_site.py" not in errors, errors.get("jipfed_site.py", "")[-3000:]
    assert {"jipfed_site", "jipfed_site_pull"} <= set(dagbag["dags"])


def test_central_dag_parses_without_torch(dagbag: dict[str, object]) -> None:
    errors = dagbag["errors"]
    assert "jipfed_central.py" not in errors, errors.get("jipfed_central.py", "")[-3000:]
    assert "jipfed_central" in dagbag["dags"]


def test_verify_detects_tampering(bundle: Path, tmp_path: Path) -> None:
    verify = [sys.executable, "-m", "jipfed.packaging.bundle", "verify"]
    clean = run([*verify, str(bundle)])
    assert clean.returncode == 0 and clean.stdout.strip().endswith("OK"), clean.stderr

    copy = tmp_path / "copy"
    assert run(["cp", "-a", str(bundle), str(copy)]).returncode == 0
    wheel = next((copy / "wheels").glob("jip_federated-*.whl"))
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    wheel.write_bytes(bytes(data))
    (copy / "charts" / "extra.tgz").write_bytes(b"not from the build")
    tampered = run([*verify, str(copy)])
    assert tampered.returncode == 1
    assert f"wheels/{wheel.name}: sha256 differs" in tampered.stderr
    assert "charts/extra.tgz: not listed" in tampered.stderr
