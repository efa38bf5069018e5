"""``jipfed task <step>`` as a pod runs it (a subprocess with the Kaapana environment contract)
produces what the in-process operator produces.

Real components: Orthanc holding synthetic DICOM cases (site-a), the central endpoint
(``jipfed.central.app`` over a local-folder model store) with two experiments started and
dispatched — one answered by the CLI, one by the operators' ``execute()`` in this process — and
``.venv/bin/jipfed``. Each path has its own ``data_root`` (no cache shared), so both do the same
work. The operators get their identity and Connections from ``AIRFLOW_VAR_*`` / ``AIRFLOW_CONN_*``
as a deployment sets them; their TaskInstance is a small stand-in that answers ``xcom_pull`` with
the work item (the XCom backend is not what is under test).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from jipfed.operators.central.aggregate import AggregateStepOperator
from jipfed.operators.site import (
    ConvertOperator,
    FetchDicomOperator,
    GetGlobalModelOperator,
    PreprocessOperator,
    SelectCohortOperator,
    TrainLocalOperator,
    UploadUpdateOperator,
)

from jipfed.central.app import create_app
from jipfed.central.client import CentralClient
from jipfed.central.serve import serve_in_thread
from jipfed.central.tokens import site_token
from jipfed.federation.dispatch import dispatch_step
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.rounds import start_experiment
from jipfed.imaging.dicomweb import upload_folder
from jipfed.imaging.synth import default_site_profiles, write_dataset
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore
from jipfed.tasks import env
from jipfed.tasks.connections import EnvConnection
from jipfed.tasks.errors import EXIT_SKIPPED, EXIT_USAGE
from jipfed.testing.orthanc import OrthancServer
from jipfed.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
JIPFED = REPO / ".venv" / "bin" / "jipfed"
SITE = "site-a"
N_CASES = 2
SHAPE = (32, 32, 16)
PREPROCESS = {"spacing_mm": [2.0, 2.0, 2.0], "spatial_size": [32, 32, 24]}
TRAIN = TrainConfig(size="tiny", steps=1, batch_size=2, lr=0.01, amp=False, augment=False)
RUN_ID = "manual__2026-01-01"
#: (step, operator class, task id, input task id) in the site DAG's order.
CHAIN = [
    ("cohort", SelectCohortOperator, "select_cohort", None),
    ("fetch", FetchDicomOperator, "fetch_dicom", "select_cohort"),
    ("convert", ConvertOperator, "convert", "fetch_dicom"),
    ("preprocess", PreprocessOperator, "preprocess", "convert"),
    ("model", GetGlobalModelOperator, "get_global_model", None),
    ("train", TrainLocalOperator, "train_local", "preprocess"),
    ("upload", UploadUpdateOperator, "upload_update", "train_local"),
]


@dataclass
class Site:
    pacs: OrthancServer
    central_url: str
    token: str
    store_root: Path
    works: dict[str, dict[str, Any]]  # experiment -> work item dict, as the central lists it


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    profiles = default_site_profiles(1, N_CASES, heterogeneous=False)
    manifest = write_dataset(tmp_path_factory.mktemp("synth"), profiles, shape=SHAPE, seed=5, progress=False)
    store_root = tmp_path_factory.mktemp("store")
    store = LocalFolderStore(store_root)
    for name in ("exp-cli", "exp-op"):
        exp_store = ExperimentStore(store, name)
        config = ExperimentConfig(name=name, sites=(SITE,), rounds=1, train=TRAIN, transport="push")
        start_experiment(exp_store, config)
        dispatch_step(exp_store, 0)
    secret = secrets.token_hex(32)
    url, stop = serve_in_thread(create_app(lambda: store, secret))
    token = site_token(secret, SITE)
    try:
        with OrthancServer(tmp_path_factory.mktemp("pacs")) as pacs:
            for case in manifest.sites[0].cases:
                assert upload_folder(pacs.pacs_config, manifest.out_dir / SITE / "dicom" / case.case_id).ok
            items = CentralClient(url, token).pending_work_dicts()
            yield Site(pacs, url, token, store_root, {item["ticket"]["experiment"]: item for item in items})
    finally:
        stop()


def identity(data_root: Path) -> dict[str, Any]:
    return {"site_id": SITE, "data_root": str(data_root), "preprocess": PREPROCESS, "device": "cpu"}


def pacs_conn(site: Site) -> dict[str, Any]:
    return {"conn_type": "jipfed_pacs", "host": site.pacs.base_url, "login": site.pacs.username}


def cli_env(site: Site, data_root: Path, step: str, task_id: str, in_dir: str | None) -> dict[str, str]:
    """The pod's environment (docs/pod-contract.md) for one step of experiment exp-cli."""
    run_dir = data_root / "workflows" / RUN_ID
    pacs = EnvConnection(conn_id="jipfed_pacs_default", **pacs_conn(site))
    central = EnvConnection(conn_id="jipfed_central_default", host=site.central_url)
    variables = {
        **env.kaapana_env(
            workflow_dir=str(run_dir),
            run_id=RUN_ID,
            dag_id="jipfed_site",
            task_id=task_id,
            in_dir=in_dir,
            out_dir=task_id,
        ),
        env.SITE: json.dumps(identity(data_root)),
        env.WORK: json.dumps(site.works["exp-cli"]),
        "JIPFED_PACS_CONN": pacs.public_json(),
        "JIPFED_PACS_PASSWORD": site.pacs.password,
        "JIPFED_CENTRAL_CONN": central.public_json(),
        "JIPFED_CENTRAL_TOKEN": site.token,
    }
    if step == "train":
        variables[env.MODEL_IN_DIR] = "get_global_model"
    return variables


def run_cli(step: str, variables: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "JIPFED_"))}
    return subprocess.run(
        [str(JIPFED), "task", step],
        env={**base, **variables, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


class TaskInstanceStandIn:
    """Answers ``xcom_pull`` with the run's work item (what the get_work task returned)."""

    def __init__(self, work: dict[str, Any]) -> None:
        self.work = work

    def xcom_pull(self, task_ids: str) -> dict[str, Any]:
        assert task_ids == "get_work"
        return self.work


def operator_env(monkeypatch: pytest.MonkeyPatch, site: Site, data_root: Path) -> None:
    monkeypatch.setenv("AIRFLOW_VAR_JIPFED_SITE", json.dumps(identity(data_root)))
    monkeypatch.setenv(
        "AIRFLOW_CONN_JIPFED_PACS_DEFAULT", json.dumps({**pacs_conn(site), "password": site.pacs.password})
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_JIPFED_CENTRAL_DEFAULT",
        json.dumps({"conn_type": "http", "host": site.central_url, "password": site.token}),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_JIPFED_MODEL_STORE_DEFAULT",
        json.dumps({"conn_type": "fs", "extra": {"path": str(site.store_root)}}),
    )


def normalised(value: Any, data_root: Path, experiment: str) -> Any:
    """``value`` without what legitimately differs between the two paths: paths, experiment name, times,
    config hashes (they hash the name) and hashes of trained weights (see :func:`differences`)."""
    text = (
        json.dumps(value, sort_keys=True).replace(str(data_root), "<data_root>").replace(experiment, "<exp>")
    )
    data = json.loads(text)
    return drop_keys(
        data,
        {"seconds", "created_at", "report_file", "config_hash", "sha256", "output_sha256", "received_at"},
    )


def drop_keys(data: Any, keys: set[str]) -> Any:
    if isinstance(data, dict):
        return {k: drop_keys(v, keys) for k, v in data.items() if k not in keys}
    if isinstance(data, list):
        return [drop_keys(v, keys) for v in data]
    return data


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """The paths at which ``a`` and ``b`` differ; floats within 1e-5 (relative) count as equal.

    Training in a subprocess with one thread and in this process with several sums in another
    order: losses differ in the 7th digit.
    """
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")
        ]
    if isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-5):
        return []
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def output_files(run_dir: Path, task_id: str) -> dict[str, Any]:
    """The JSON files a step wrote (parsed) and the sizes of the others."""
    out: dict[str, Any] = {}
    for path in sorted((run_dir / task_id).iterdir()):
        if path.name == env.RESULT_FILE:
            continue
        out[path.name] = json.loads(path.read_text()) if path.suffix == ".json" else path.stat().st_size
    return out


@pytest.mark.slow  # ~2 min on 2 cores: every CLI step imports torch and MONAI afresh
def test_each_step_as_a_command_matches_the_operator(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli_root, op_root = tmp_path / "cli", tmp_path / "op"
    operator_env(monkeypatch, site, op_root)
    context = {"run_id": RUN_ID, "ti": TaskInstanceStandIn(site.works["exp-op"])}
    for step, cls, task_id, in_task in CHAIN:
        extra = {"model_in_dir": "get_global_model"} if step == "train" else {}
        operator = cls(task_id=task_id, operator_in_dir=in_task, **extra)
        op_result = operator.execute(context)

        done = run_cli(step, cli_env(site, cli_root, step, task_id, in_task))
        assert done.returncode == 0, f"jipfed task {step}: {done.stderr[-3000:]}"
        cli_result = json.loads(done.stdout.strip().splitlines()[-1])
        run_dir = cli_root / "workflows" / RUN_ID
        assert json.loads((run_dir / task_id / env.RESULT_FILE).read_text()) == cli_result

        op_dir = op_root / "workflows" / RUN_ID
        assert not differences(
            normalised(cli_result, cli_root, "exp-cli"), normalised(op_result, op_root, "exp-op")
        )
        cli_files = normalised(output_files(run_dir, task_id), cli_root, "exp-cli")
        op_files = normalised(output_files(op_dir, task_id), op_root, "exp-op")
        assert not differences(cli_files, op_files), step
    # the same cases were prepared on both paths, and both uploads reached the central
    prepared = json.loads((cli_root / "workflows" / RUN_ID / "preprocess" / "prepared.json").read_text())
    assert prepared["ready_cases"] == N_CASES
    assert sorted(p.name for p in (cli_root / "preprocessed").rglob("*")) == sorted(
        p.name for p in (op_root / "preprocessed").rglob("*")
    )
    store = LocalFolderStore(site.store_root)
    assert [len(ExperimentStore(store, e).list_updates(0)) for e in ("exp-cli", "exp-op")] == [1, 1]

    # the central's step: aggregate through the command and through the operator
    store_conn = EnvConnection(
        conn_id="jipfed_model_store_default", conn_type="fs", extra={"path": str(site.store_root)}
    )
    central_dir = tmp_path / "central" / RUN_ID
    variables = {
        **env.kaapana_env(
            workflow_dir=str(central_dir),
            run_id=RUN_ID,
            dag_id="jipfed_central",
            task_id="aggregate",
            in_dir=None,
            out_dir="aggregate",
        ),
        "JIPFED_STORE_CONN": store_conn.public_json(),
        env.EXPERIMENT: "exp-cli",
        env.STEP: "0",
    }
    done = run_cli("aggregate", variables)
    assert done.returncode == 0, done.stderr[-3000:]
    cli_record = json.loads(done.stdout.strip().splitlines()[-1])
    op_record = AggregateStepOperator(task_id="aggregate", experiment="exp-op", step=0).execute(context)
    assert cli_record["included"] == op_record["included"] == [SITE]
    assert not differences(
        normalised(cli_record, cli_root, "exp-cli"), normalised(op_record, op_root, "exp-op")
    )


def test_bad_environment_and_nothing_to_do_have_their_exit_codes(tmp_path: Path) -> None:
    variables = env.kaapana_env(
        workflow_dir=str(tmp_path / RUN_ID),
        run_id=RUN_ID,
        dag_id="jipfed_site",
        task_id="convert",
        in_dir="fetch_dicom",
        out_dir="convert",
    )
    done = run_cli("convert", variables)
    assert done.returncode == EXIT_USAGE
    assert "environment variable JIPFED_SITE is not set" in done.stderr

    conf_dir = tmp_path / RUN_ID / "conf"
    conf_dir.mkdir(parents=True)
    (conf_dir / "conf.json").write_text(json.dumps({"experiment": "exp1"}))  # a run that only finalizes
    store = EnvConnection(conn_id="store", conn_type="fs", extra={"path": str(tmp_path / "store")})
    done = run_cli("aggregate", {**variables, "JIPFED_STORE_CONN": store.public_json()})
    assert done.returncode == EXIT_SKIPPED, done.stderr
    assert re.search(r"skipped: experiment 'exp1': no step to aggregate", done.stderr)


def test_the_identity_repeats_the_imaging_constants_faithfully() -> None:
    """``jipfed.tasks.identity`` validates without importing pydicom, so it repeats two constants."""
    from jipfed.cohort.qido import DEFAULT_DATASET
    from jipfed.imaging.pipeline import TRANSPORTS
    from jipfed.tasks import identity

    assert identity.FETCH_TRANSPORTS == TRANSPORTS
    assert identity.DEFAULT_DATASET == DEFAULT_DATASET
