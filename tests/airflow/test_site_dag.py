"""The site DAGs (dags/jipfed_site.py): structure, imports and ``dag.test()`` on Airflow 3.3 and 2.11.

The end-to-end runs use only real components: Orthanc holding synthetic DICOM cases, the central
endpoint (``jipfed.central.app`` served by uvicorn) over moto's S3 server with a started and
dispatched experiment, and ``dag.test()`` in each Airflow's own venv. Connections and the site
identity come from ``AIRFLOW_CONN_*`` / ``AIRFLOW_VAR_*`` environment variables, as a deployment
would set them.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from jipfed.central.app import create_app
from jipfed.central.serve import serve_in_thread
from jipfed.central.tokens import site_token
from jipfed.federation.dispatch import FAILED, dispatch_step, load_dispatch, site_status
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.rounds import aggregate_step, start_experiment
from jipfed.imaging.dicomweb import upload_folder
from jipfed.imaging.preprocess import PreprocessConfig, load_index
from jipfed.imaging.synth import default_site_profiles, write_dataset
from jipfed.storage.base import ModelStore
from jipfed.storage.state import ExperimentStore
from jipfed.testing.airflow import check_dag_folder, run_dag_test
from jipfed.testing.orthanc import OrthancServer
from jipfed.testing.recording import Recorder
from jipfed.testing.s3 import S3TestServer
from jipfed.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
DAG_FILE = REPO / "dags" / "jipfed_site.py"
PYTHONS = {"airflow3": REPO / ".venv" / "bin" / "python", "airflow2": REPO / ".venv-af2" / "bin" / "python"}
SITE = "site-a"
N_CASES, N_SERIES = 3, 5  # 4 MR series + 1 SEG per case
SHAPE = (32, 32, 16)
PREPROCESS = {"spacing_mm": [2.0, 2.0, 2.0], "spatial_size": [32, 32, 24]}
TRAIN = TrainConfig(size="tiny", steps=1, batch_size=2, lr=0.01, amp=False, augment=False)
#: The data preparation path; the model download runs beside it (work → get_global_model → train).
DATA_CHAIN = ["select_cohort", "fetch_dicom", "convert", "preprocess"]
CHAIN = [*DATA_CHAIN, "get_global_model", "train_local", "upload_update"]


# -- structure (in this process, Airflow 3.3) ------------------------------------------------------


def load_dag_module(monkeypatch: pytest.MonkeyPatch, hosted: str | None) -> ModuleType:
    """Import dags/jipfed_site.py afresh with ``JIPFED_HOSTED_SITES`` set to ``hosted``."""
    if hosted is None:
        monkeypatch.delenv("JIPFED_HOSTED_SITES", raising=False)
    else:
        monkeypatch.setenv("JIPFED_HOSTED_SITES", hosted)
    name = f"jipfed_site_dag_{secrets.token_hex(4)}"
    spec = importlib.util.spec_from_file_location(name, DAG_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def dags_of(module: ModuleType) -> dict[str, Any]:
    from jipfed.operators.compat import DAG

    return {value.dag_id: value for value in vars(module).values() if isinstance(value, DAG)}


#: The edges to train_local taken on cached rounds: from the work task (it prepared the round
#: itself) and from select_cohort (it ran the cached data stages itself).
SHORTCUT_FROM = {"get_work", "wait_for_work", "select_cohort"}


def linear_order(dag: Any, skip: str = "get_global_model") -> list[str]:
    """The task ids from the single root along the downstream edges, ``skip`` (a side branch) and
    the cached-data shortcuts left out."""
    [root] = [t for t in dag.tasks if not t.upstream_task_ids]
    order = [root.task_id]
    while True:
        downstream = dag.get_task(order[-1]).downstream_task_ids - {skip}
        if order[-1] in SHORTCUT_FROM:
            assert "train_local" in downstream, downstream
            downstream -= {"train_local"}
        if not downstream:
            return order
        assert len(downstream) == 1, f"{order[-1]} has several downstream tasks: {downstream}"
        order.append(next(iter(downstream)))


def check_model_branch(dag: Any, work_task: str) -> None:
    """The model download hangs off the work task and feeds the training only."""
    model = dag.get_task("get_global_model")
    assert model.upstream_task_ids == {work_task} and model.downstream_task_ids == {"train_local"}


def test_site_dags_structure(monkeypatch: pytest.MonkeyPatch) -> None:
    from jipfed.operators.site import report_failure_to_central

    dags = dags_of(load_dag_module(monkeypatch, None))
    assert sorted(dags) == ["jipfed_site", "jipfed_site_pull", "jipfed_site_requests"]
    push, pull = dags["jipfed_site"], dags["jipfed_site_pull"]
    steps = [*DATA_CHAIN, "train_local", "upload_update", "cleanup"]
    assert linear_order(push) == ["get_work", *steps]
    assert linear_order(pull) == ["wait_for_work", *steps]
    check_model_branch(push, "get_work")
    check_model_branch(pull, "wait_for_work")

    assert push.schedule is None and push.max_active_runs == 1
    assert set(push.params) == {"experiment", "round", "step"}
    assert push.params.get_param("round").schema == {"type": "integer", "minimum": 0, "title": "Round"}
    assert str(pull.schedule) == "@continuous" and pull.max_active_runs == 1
    assert pull.is_paused_upon_creation is True and pull.start_date is not None
    for dag in (push, pull):
        assert {"jipfed", "site"} <= set(dag.tags) and "jipfed_site" in dag.doc_md
        work_task = linear_order(dag)[0]
        for task_id in CHAIN:
            task = dag.get_task(task_id)
            assert task.on_failure_callback in (report_failure_to_central, [report_failure_to_central])
            # train_local also runs when the tasks before it were skipped (cached data prepared earlier)
            rule = "none_failed_min_one_success" if task_id == "train_local" else "all_success"
            assert (task.work_task_id, task.site_variable, task.trigger_rule) == (work_task, "jipfed_site", rule)
        cleanup = dag.get_task("cleanup")
        assert cleanup.trigger_rule == "all_done" and cleanup.is_teardown and not cleanup.on_failure_callback
        assert not dag.get_task(work_task).on_failure_callback
        # on cached rounds the work task does the cohort (with its cached stages) and the model download
        assert dag.get_task(work_task).prepare == ("select_cohort", "get_global_model")
        # Kaapana folder chaining: each task reads the out dir of the one before it
        assert [dag.get_task(t).operator_in_dir for t in CHAIN[1:4]] == CHAIN[:3]
        assert dag.get_task("select_cohort").cached_stages == tuple(DATA_CHAIN[1:])
        train = dag.get_task("train_local")
        assert (train.operator_in_dir, train.model_in_dir) == ("preprocess", "get_global_model")
        assert dag.get_task("upload_update").operator_in_dir == "train_local"
    sensor = pull.get_task("wait_for_work")
    assert sensor.deferrable and sensor.soft_fail and sensor.timeout == 3600 and sensor.poke_interval == 5
    assert sensor.worker_wait_s == 60  # the next step usually comes within seconds: waits in the worker first


def test_hosted_sites_make_one_dag_set_each(monkeypatch: pytest.MonkeyPatch) -> None:
    dags = dags_of(load_dag_module(monkeypatch, "site-a, site-b"))
    assert sorted(dags) == [
        "jipfed_site__site-a",
        "jipfed_site__site-b",
        "jipfed_site_pull__site-a",
        "jipfed_site_pull__site-b",
        "jipfed_site_requests__site-a",
        "jipfed_site_requests__site-b",
    ]
    for site in ("site-a", "site-b"):
        for dag_id in (f"jipfed_site__{site}", f"jipfed_site_pull__{site}"):
            variables = {(t.site_variable, t.hosted_site) for t in dags[dag_id].tasks}
            assert variables == {(f"jipfed_site__{site}", site)}
            assert f"jipfed_site__{site}" in dags[dag_id].doc_md
    with pytest.raises(ValueError, match="more than once"):
        load_dag_module(monkeypatch, "site-a,site-a")


def test_dag_folder_imports_on_airflow3_and_airflow2(tmp_path: Path) -> None:
    for version, python in PYTHONS.items():
        dags = check_dag_folder(require(python), REPO / "dags", home=tmp_path / version)
        assert dags["jipfed_site"] == dags["jipfed_site_pull"] == str(DAG_FILE), version


# -- end to end: Orthanc + central endpoint over S3 + dag.test() -----------------------------------


def require(python: Path) -> Path:
    if not python.exists():
        pytest.fail(f"{python} is missing: `make setup` (scripts/setup.sh) creates it", pytrace=False)
    return python


@dataclass
class Central:
    url: str
    store: ModelStore
    secret: str
    recorder: Recorder


@pytest.fixture(scope="module")
def s3() -> Iterator[S3TestServer]:
    with S3TestServer() as server:
        yield server


@pytest.fixture
def central(s3: S3TestServer) -> Iterator[Central]:
    """The central endpoint over a fresh S3 prefix (so no other test's work is pending)."""
    store = s3.make_store(prefix=f"central-{secrets.token_hex(4)}")
    secret = secrets.token_hex(32)
    recorder = Recorder(create_app(lambda: store, secret))  # keeps every byte the site sends
    url, stop = serve_in_thread(recorder)
    try:
        yield Central(url, store, secret, recorder)
    finally:
        stop()


@pytest.fixture(scope="module")
def synth_dicom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """site-a's synthetic DICOM cases (one folder per case)."""
    profiles = default_site_profiles(1, N_CASES, heterogeneous=False)
    manifest = write_dataset(tmp_path_factory.mktemp("synth"), profiles, shape=SHAPE, seed=3, progress=False)
    return manifest.out_dir / SITE / "dicom"


def patient_identifiers(dicom_root: Path) -> list[str]:
    """Every patient name, patient id and DICOM UID in the site's files, and the case folders' names."""
    import pydicom

    words = set()
    for path in dicom_root.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        words |= {str(ds.PatientName), str(ds.PatientID), path.relative_to(dicom_root).parts[0]}
        words |= {str(ds.get(tag, "")) for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    return sorted(word for word in words if len(word) >= 4)


def assert_nothing_identifying_was_sent(central: Central, dicom_root: Path, *more: str) -> None:
    """The end-to-end scan: no identifier, file name or site path in any byte the central received."""
    words = patient_identifiers(dicom_root) + [str(dicom_root), *more]
    assert len(words) > N_CASES * N_SERIES and central.recorder.received
    assert central.recorder.found(words) == [], "identifying bytes left the site"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, synth_dicom: Path) -> Iterator[OrthancServer]:
    """Orthanc holding the synthetic cases of site-a."""
    with OrthancServer(tmp_path_factory.mktemp("pacs")) as server:
        for case_dir in sorted(p for p in synth_dicom.iterdir() if p.is_dir()):
            report = upload_folder(server.pacs_config, case_dir)
            assert report.ok and report.stored == report.files > 0
        yield server


@pytest.fixture(scope="module")
def dags_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DAGs folder holding only the site DAG file (the other DAG files are not under test here)."""
    folder = tmp_path_factory.mktemp("dags")
    shutil.copy(DAG_FILE, folder / DAG_FILE.name)
    return folder


@pytest.fixture(scope="module")
def airflow_homes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One AIRFLOW_HOME per Airflow version (its DB is migrated once)."""
    return {version: tmp_path_factory.mktemp(f"home-{version}") for version in PYTHONS}


def dispatched(central: Central, name: str, rounds: int = 1) -> ExperimentStore:
    """Start an experiment of site-a alone (push) and dispatch its first step."""
    exp_store = ExperimentStore(central.store, name)
    config = ExperimentConfig(
        name=name, sites=(SITE,), rounds=rounds, train=TRAIN, round_timeout_s=600.0, transport="push"
    )
    start_experiment(exp_store, config)
    dispatch_step(exp_store, 0)
    return exp_store


def site_env(central: Central, pacs: OrthancServer, data_root: Path) -> dict[str, str]:
    """The site's configuration as a deployment sets it: one Variable and two Connections."""
    identity = {"site_id": SITE, "data_root": str(data_root), "preprocess": PREPROCESS, "device": "cpu"}
    return {
        "AIRFLOW_VAR_JIPFED_SITE": json.dumps(identity),
        "AIRFLOW_CONN_JIPFED_CENTRAL_DEFAULT": json.dumps(
            {"conn_type": "http", "host": central.url, "password": site_token(central.secret, SITE)}
        ),
        "AIRFLOW_CONN_JIPFED_PACS_DEFAULT": json.dumps(
            {
                "conn_type": "jipfed_pacs",
                "host": pacs.base_url,
                "login": pacs.username,
                "password": pacs.password,
                "extra": {"dimse_port": pacs.dicom_port},
            }
        ),
        "OMP_NUM_THREADS": "1",  # 2 cores shared by the whole test run
    }


def latest_report(data_root: Path) -> dict[str, Any]:
    return json.loads(max((data_root / "reports").glob("prepare-*.json")).read_text())


def counts(report: dict[str, Any]) -> dict[str, int]:
    names = (
        "cohort_cases",
        "fetched",
        "fetch_cached",
        "converted",
        "convert_cached",
        "preprocessed",
        "ready_cases",
    )
    return {name: report[name] for name in names}


def assert_caches_kept_and_run_folders_gone(data_root: Path) -> None:
    assert list((data_root / "workflows").iterdir()) == []
    assert len(list((data_root / "dicom").iterdir())) == N_CASES
    assert len(list((data_root / "nifti").glob("*/case.json"))) == N_CASES
    pre = data_root / "preprocessed" / PreprocessConfig(**PREPROCESS).config_hash()  # type: ignore[arg-type]
    assert len(load_index(pre)) == N_CASES


@pytest.mark.slow
@pytest.mark.parametrize("version", list(PYTHONS))
def test_push_run_uploads_an_update_and_a_pull_run_reuses_the_caches(
    version: str,
    central: Central,
    pacs: OrthancServer,
    dags_folder: Path,
    airflow_homes: dict[str, Path],
    tmp_path: Path,
    synth_dicom: Path,
) -> None:
    python, home = require(PYTHONS[version]), airflow_homes[version]
    data_root = tmp_path / "site"
    env = site_env(central, pacs, data_root)
    exp_store = dispatched(central, "e2e", rounds=2)

    # push: the central's trigger names the step; the run trains and uploads
    conf = {"experiment": "e2e", "round": 0, "step": 0}
    result = run_dag_test(python, dags_folder, "jipfed_site", home=home, run_conf=conf, env=env)
    assert result["state"] == "success", result
    assert set(result["tasks"].values()) == {"success"} and len(result["tasks"]) == 9
    [update] = exp_store.list_updates(0)
    _, manifest = exp_store.load_update(0, update)
    assert (manifest["site"], manifest["round"], manifest["n_samples"]) == (SITE, 0, 2)  # 1 of 3 held out
    assert manifest["config_hash"] == exp_store.config_hash() and "val_dice_mean" in manifest["metrics"]
    first = latest_report(data_root)
    assert counts(first) == dict(
        cohort_cases=N_CASES, fetched=N_CASES * N_SERIES, fetch_cached=0, converted=N_CASES,
        convert_cached=0, preprocessed=N_CASES, ready_cases=N_CASES,
    )  # fmt: skip
    assert_caches_kept_and_run_folders_gone(data_root)
    record = aggregate_step(exp_store, 0)  # the central decodes and validates the update again
    assert list(record.included) == [SITE]

    # pull: the sensor finds step 1 at the central by itself; no DICOM work this time
    dispatch_step(exp_store, 1)
    result = run_dag_test(python, dags_folder, "jipfed_site_pull", home=home, env=env)
    assert result["state"] == "success", result
    assert result["tasks"]["wait_for_work[-1]"] == "success"
    # the work task prepared the cached round itself: cohort, fetch → preprocess, model did not start
    skipped = {t for t, state in result["tasks"].items() if state == "skipped"}
    assert skipped == {f"{t}[-1]" for t in [*DATA_CHAIN, "get_global_model"]}, result["tasks"]
    assert exp_store.list_updates(1) == [SITE]
    second = latest_report(data_root)
    assert second != first and counts(second) == dict(
        cohort_cases=N_CASES, fetched=0, fetch_cached=N_CASES * N_SERIES, converted=0,
        convert_cached=N_CASES, preprocessed=0, ready_cases=N_CASES,
    )  # fmt: skip
    assert_caches_kept_and_run_folders_gone(data_root)
    assert_nothing_identifying_was_sent(central, synth_dicom, str(data_root), pacs.base_url)


@pytest.mark.slow
@pytest.mark.parametrize("version", list(PYTHONS))
def test_pacs_down_fails_the_run_and_the_central_learns_why(
    version: str,
    central: Central,
    dags_folder: Path,
    airflow_homes: dict[str, Path],
    tmp_path: Path,
    synth_dicom: Path,
) -> None:
    python, home = require(PYTHONS[version]), airflow_homes[version]
    with OrthancServer(tmp_path / "pacs") as down:
        pass  # started and stopped: its ports are known, nothing answers there any more
    data_root = tmp_path / "site"
    exp_store = dispatched(central, "pacsdown")
    conf = {"experiment": "pacsdown", "round": 0, "step": 0}
    result = run_dag_test(
        python, dags_folder, "jipfed_site", home=home, run_conf=conf, env=site_env(central, down, data_root)
    )

    assert result["state"] == "failed", result
    tasks = {key.removesuffix("[-1]"): state for key, state in result["tasks"].items()}
    assert (tasks["get_work"], tasks["select_cohort"], tasks["cleanup"]) == ("success", "failed", "success")
    assert {tasks[t] for t in CHAIN[1:] if t != "get_global_model"} == {"upstream_failed"}
    assert tasks["get_global_model"] == "success"  # the side branch does not need the PACS
    dispatch = load_dispatch(exp_store, 0, 0)
    assert dispatch is not None
    status, reason = site_status(exp_store, dispatch, SITE)
    assert status == FAILED
    assert "select_cohort failed: " in reason and "cohort query" in reason, reason
    assert down.base_url not in reason  # failure reports leave the site sanitised
    assert_nothing_identifying_was_sent(central, synth_dicom, str(data_root), down.base_url)
    assert list((data_root / "workflows").iterdir()) == []
