"""``jipfed demo`` from an installed wheel, away from the checkout (issue 11, item 5).

The wheel is built from the sources as the offline bundle builds it, and installed with pip into a
fresh venv. That venv sees the pinned dependencies of the test venv through a ``.pth`` line (a
plain path entry: the checkout's editable finder is NOT loaded), and gets the dependencies' console
scripts (``airflow``, ``dcm2niix``) rewritten to its own interpreter, as a pip install would have
made them. So every ``jipfed`` module, every DAG file and the plugin come from the wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from jipfed.packaging.sources import build_wheel

pytestmark = pytest.mark.slow

DEPS_SITE = Path(sysconfig.get_paths()["purelib"])
DEPS_BIN = Path(sys.executable).parent


def _console_scripts(venv: Path) -> None:
    """Re-point the dependencies' console scripts (airflow, dcm2niix, ...) at ``venv``'s interpreter."""
    shebang = f"#!{DEPS_BIN / 'python'}"
    for script in DEPS_BIN.iterdir():
        target = venv / "bin" / script.name
        if target.exists() or not script.is_file():
            continue
        head = script.read_bytes()[:200]
        if not head.startswith(b"#!") or not head.split(b"\n", 1)[0].decode().startswith(shebang):
            continue
        body = script.read_text().split("\n", 1)[1]
        target.write_text(f"#!{venv / 'bin' / 'python'}\n{body}")
        target.chmod(0o755)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the jip-federated wheel installed by pip (no checkout on its path)."""
    root = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(root / "dist")
    venv = root / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    (Path(purelib) / "jipfed-deps.pth").write_text(f"{DEPS_SITE}\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
         "--no-deps", str(wheel)],
        check=True,
    )
    _console_scripts(venv)
    return venv


def test_the_wheel_carries_the_package_the_dags_and_the_plugin(wheel_venv: Path, tmp_path: Path) -> None:
    code = (
        "import json, jipfed, jipfed.operators, jipfed.plugins.jipfed_plugin as p;"
        "from jipfed.local.dags import dag_folder;"
        "print(json.dumps({'jipfed': jipfed.__file__, 'operators': jipfed.operators.__file__,"
        " 'plugin': p.__file__, 'dags': str(dag_folder()),"
        " 'files': sorted(f.name for f in dag_folder().glob('jipfed_*.py'))}))"
    )
    out = subprocess.run(
        [str(wheel_venv / "bin" / "python"), "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True
    )
    where = json.loads(out.stdout)
    for key in ("jipfed", "operators", "plugin", "dags"):
        assert where[key].startswith(str(wheel_venv)), (key, where[key])
    package = Path(where["jipfed"]).parent
    for data in ("central/static/uplot/uPlot.iife.min.js", "central/static/uplot/LICENSE", "plugins/templates/jipfed/page.html"):
        assert (package / data).is_file(), f"{data} is not in the wheel"
    repo_dags = sorted(p.name for p in (Path(__file__).parents[2] / "dags").glob("jipfed_*.py"))
    assert where["files"] == repo_dags


def test_jipfed_demo_runs_from_the_installed_wheel(wheel_venv: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AIRFLOW_HOME")}
    result = subprocess.run(
        [str(wheel_venv / "bin" / "jipfed"), "demo", "--workdir", str(workdir), "--sites", "2", "--cases", "2",
         "--rounds", "1", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The DAG processor parsed the DAG files shipped in the wheel, not the checkout's dags/.
    logs = "\n".join(p.read_text(errors="replace") for p in workdir.rglob("*.log"))
    assert str(wheel_venv / "lib") in logs and "jipfed/dags/jipfed_central.py" in logs
    assert "/work/main/dags" not in logs and str(Path(__file__).parents[2] / "dags") not in logs
    # rc 0 means the experiment finished; its final model is published in the store it names.
    (store_line,) = [line for line in result.stdout.splitlines() if line.startswith("store: ")]
    final = Path(store_line.removeprefix("store: ")) / "final"
    assert any(final.glob("*.safetensors")), sorted(p.name for p in final.parent.iterdir())
