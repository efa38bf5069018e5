"""The scheduler's view: DAG files, operators and plugin import in an Airflow without torch.

``.venv-sched`` is what a scheduler / DAG processor image holds: Airflow 2.11 (what Kaapana 0.6
runs), common-compat, cncf-kubernetes and ``jip-federated`` with its light dependencies only — no
torch, MONAI, pydicom, nibabel, highdicom, dicomweb-client or pynetdicom. A subprocess in that venv
checks that they are really absent, builds a DagBag over dags/, imports the operators (including
the pod module) and the plugin, and renders the pod of a pod-mode site task.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SCHED_PYTHON = REPO / ".venv-sched" / "bin" / "python"
IDENTITY = {
    "site_id": "site-a",
    "data_root": "/kaapana/mounted/workflows/data/jipfed",
    "execution": {
        "mode": "pod",
        "image": "registry.example/jipfed-worker:0.1.0",
        "namespace": "jipfed",
        "volumes": {
            "data": {"claim": "workflow-data-pv-claim", "airflow_path": "/kaapana/mounted/workflows/data"}
        },
        "secrets": {"pacs_password": {"name": "jipfed-site", "key": "pacs-password"}},
    },
}
HEAVY = ("torch", "monai", "pydicom", "nibabel", "highdicom", "dicomweb_client", "pynetdicom")

PROBE = """
import importlib, importlib.util, json, sys, tempfile
heavy = [name for name in HEAVY if importlib.util.find_spec(name) is not None]
from airflow.models.dagbag import DagBag
bag = DagBag(dag_folder=DAGS, include_examples=False)
modules = {}
for name in ("jipfed.operators.site", "jipfed.operators.central", "jipfed.operators.sensors.collect_update",
             "jipfed.operators.triggers.site_update", "jipfed.operators.pod", "jipfed.plugins.jipfed_plugin",
             "jipfed.tasks.env", "jipfed.commands.task"):
    try:
        importlib.import_module(name)
        modules[name] = "ok"
    except Exception as exc:
        modules[name] = f"{type(exc).__name__}: {exc}"
# pod mode: the site DAG's task renders its pod here (the launcher side needs no torch)
from jipfed.tasks.identity import SiteIdentity
from jipfed.tasks.run import make_run
identity = SiteIdentity.from_dict(IDENTITY)
task = bag.dags["jipfed_site"].get_task("fetch_dicom")  # bag.get_dag would need a metadata DB
run = make_run(identity, identity.run_dir("r1"), operator_in_dir="select_cohort", operator_out_dir="fetch_dicom",
               work_data={"ticket": {"experiment": "exp1", "round": 0, "step": 0}})
container = task.pod_for(run, "r1").build_pod_request_obj(None, dry_run=True).spec.containers[0]
pod = {"image": container.image, "args": container.args, "env": sorted(e.name for e in container.env)}
loaded = sorted(name for name in sys.modules if name.split(".")[0] in HEAVY)
print(json.dumps({"heavy": heavy, "loaded": loaded, "errors": {k: v[-600:] for k, v in bag.import_errors.items()},
                  "dag_ids": sorted(bag.dag_ids), "modules": modules, "pod": pod}))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not SCHED_PYTHON.exists():
        pytest.fail(
            f"{SCHED_PYTHON} is missing: the scheduler venv (light install, no torch) is not built",
            pytrace=False,
        )
    home = tmp_path_factory.mktemp("airflow-home")
    code = f"HEAVY = {HEAVY!r}\nDAGS = {str(REPO / 'dags')!r}\nIDENTITY = {IDENTITY!r}\n" + PROBE
    pacs = {"conn_type": "jipfed_pacs", "host": "http://pacs:8042", "login": "u", "password": "p"}
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PATH": "/usr/bin:/bin",
        "AIRFLOW_CONN_JIPFED_PACS_DEFAULT": json.dumps(pacs),
    }
    done = subprocess.run(
        [str(SCHED_PYTHON), "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_heavy_libraries_are_absent(probe: dict[str, Any]) -> None:
    assert probe["heavy"] == [] and probe["loaded"] == []


def test_operators_pod_module_and_plugin_import(probe: dict[str, Any]) -> None:
    assert probe["modules"] == {name: "ok" for name in probe["modules"]}


def test_a_pod_mode_task_renders_its_pod_without_torch(probe: dict[str, Any]) -> None:
    assert probe["pod"]["image"] == "registry.example/jipfed-worker:0.1.0"
    assert probe["pod"]["args"] == ["task", "fetch"]
    assert {"WORKFLOW_DIR", "JIPFED_SITE", "JIPFED_WORK", "JIPFED_PACS_CONN", "JIPFED_PACS_PASSWORD"} <= set(
        probe["pod"]["env"]
    )


def test_the_site_dags_parse(probe: dict[str, Any]) -> None:
    site_errors = {path: text for path, text in probe["errors"].items() if path.endswith("jipfed_site.py")}
    assert site_errors == {}
    assert {"jipfed_site", "jipfed_site_pull", "jipfed_site_requests"} <= set(probe["dag_ids"])


def test_the_dag_folder_has_no_import_errors(probe: dict[str, Any]) -> None:
    assert probe["errors"] == {}
    assert probe["dag_ids"] == [
        "jipfed_central",
        "jipfed_nightly",
        "jipfed_site",
        "jipfed_site_pull",
        "jipfed_site_requests",
    ]
