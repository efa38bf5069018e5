"""Pod mode without a cluster: the pod a DAG task launches, and the messages when a pod fails.

The pods are rendered through the operators' own code path (``SiteOperator.pod_for`` /
``AggregateStepOperator.pod_for``, what ``execute()`` launches, then the provider's
``KubernetesPodOperator.build_pod_request_obj``) from the DAG files' tasks, a validated identity
and a real work item; each rendered pod is validated against the Kubernetes schema
(kubernetes-validate). Not exercised (no Kubernetes API here): creating and watching the pod, and
the provider's ``cleanup`` that ``JipfedPodOperator`` wraps (its error comes from ``clear_failure``,
tested below on V1Pod objects).
"""

from __future__ import annotations

import importlib.util
import json
import secrets
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest
from jipfed.operators.compat import DAG, AirflowException, AirflowFailException
from jipfed.operators.pod import clear_failure, pod_failure_message, pod_operator_class
from kubernetes.client import ApiClient
from kubernetes.client import models as k8s

from jipfed.federation.dispatch import WorkItem, dispatch_step
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.rounds import start_experiment
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore
from jipfed.tasks.execution import CentralSettings, ExecutionConfig
from jipfed.tasks.identity import SiteIdentity
from jipfed.tasks.run import make_run
from jipfed.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
SITE = "site-a"
IMAGE = "registry.example/jipfed/jipfed-worker:0.1.0"
PACS_PASSWORD = "pacs-" + secrets.token_hex(8)
CENTRAL_TOKEN = "jipfed.site-a." + secrets.token_hex(16)
STORE_SECRET = "store-" + secrets.token_hex(8)
K8S_VERSION = "1.30"
GPU_NODES = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def execution(**overrides: Any) -> dict[str, Any]:
    config = {
        "mode": "pod",
        "image": IMAGE,
        "namespace": "jipfed",
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "6Gi"}},
        "steps": {
            "train": {
                "gpu": 1,
                "resources": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "24Gi"}},
                "node_selector": GPU_NODES,
                "tolerations": [GPU_TOLERATION],
            }
        },
        "volumes": {
            "data": {
                "claim": "workflow-data-pv-claim",
                "mount_path": "/kaapana/mounted/data",
                "airflow_path": "/kaapana/mounted/workflows/data",
            },
            "models": {"claim": "models-pv-claim"},
        },
        "secrets": {
            "pacs_password": {"name": "jipfed-site", "key": "pacs-password"},
            "central_token": {"name": "jipfed-site", "key": "central-token"},
            "store_secret_key": {"name": "jipfed-central", "key": "secret-key"},
        },
    }
    return {**config, **overrides}


def load_dag_file(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A file in dags/, imported afresh (single-site)."""
    monkeypatch.delenv("JIPFED_HOSTED_SITES", raising=False)
    module_name = f"{name}_{secrets.token_hex(4)}"
    spec = importlib.util.spec_from_file_location(module_name, REPO / "dags" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, module_name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """The site's and central's Connections, as a deployment sets them (with real secrets)."""
    pacs = {"conn_type": "jipfed_pacs", "host": "http://pacs:8042", "login": "u", "password": PACS_PASSWORD}
    central = {"conn_type": "http", "host": "https://central.example/jipfed", "password": CENTRAL_TOKEN}
    store = {
        "conn_type": "aws",
        "login": "access",
        "password": STORE_SECRET,
        "extra": {"endpoint_url": "http://minio:9000", "bucket": "jipfed"},
    }
    for conn_id, conn in (("PACS", pacs), ("CENTRAL", central), ("MODEL_STORE", store)):
        monkeypatch.setenv(f"AIRFLOW_CONN_JIPFED_{conn_id}_DEFAULT", json.dumps(conn))


@pytest.fixture(scope="module")
def work_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real work item: the first step of an experiment started and dispatched in a local store."""
    exp_store = ExperimentStore(LocalFolderStore(tmp_path_factory.mktemp("store")), "exp1")
    config = ExperimentConfig(name="exp1", sites=(SITE,), rounds=1, train=TrainConfig(size="tiny", steps=1))
    start_experiment(exp_store, config)
    return WorkItem(dispatch=dispatch_step(exp_store, 0), config=config.to_dict(), dataset=None).to_dict()


def identity(**exec_overrides: Any) -> SiteIdentity:
    root = "/kaapana/mounted/workflows/data/jipfed"
    return SiteIdentity.from_dict(
        {"site_id": SITE, "data_root": root, "execution": execution(**exec_overrides)}
    )


def render(operator: Any) -> dict[str, Any]:
    """The pod the provider would create, as the API's JSON, validated against the Kubernetes schema."""
    pod = ApiClient().sanitize_for_serialization(operator.build_pod_request_obj(None, dry_run=True))
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    return pod


def site_pod(
    task_id: str, ident: SiteIdentity, work: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    module = load_dag_file("jipfed_site", monkeypatch)
    task = module.jipfed_site.get_task(task_id)
    run_dir = ident.run_dir("manual__2026-01-01")
    run = make_run(
        ident,
        run_dir,
        operator_in_dir=task.operator_in_dir,
        operator_out_dir=task.operator_out_dir,
        work_data=work,
    )
    return render(task.pod_for(run, "manual__2026-01-01"))


def env_of(container: dict[str, Any]) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    plain = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    return plain, refs


def test_train_pod_asks_for_a_gpu_and_gets_the_env_contract(
    connections: None, work_data: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pod = site_pod("train_local", identity(), work_data, monkeypatch)
    spec = pod["spec"]
    [container] = spec["containers"]
    assert (container["image"], container["command"], container["args"]) == (
        IMAGE,
        ["jipfed"],
        ["task", "train"],
    )
    assert container["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
        "limits": {"memory": "24Gi", "nvidia.com/gpu": "1"},
    }
    assert spec["nodeSelector"] == GPU_NODES
    assert spec["tolerations"] == [GPU_TOLERATION]
    assert pod["metadata"]["namespace"] == "jipfed" and spec["restartPolicy"] == "Never"
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "runAsNonRoot": True}
    assert pod["metadata"]["labels"]["jipfed/step"] == "train"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["workflow-data"]["persistentVolumeClaim"] == {"claimName": "workflow-data-pv-claim"}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "models-pv-claim"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"workflow-data": "/kaapana/mounted/data", "models": "/models", "dshm": "/dev/shm"}
    plain, refs = env_of(container)
    run_dir = "/kaapana/mounted/data/jipfed/workflows/manual__2026-01-01"  # the PVC as the pod sees it
    assert plain["WORKFLOW_DIR"] == run_dir
    assert (plain["OPERATOR_IN_DIR"], plain["OPERATOR_OUT_DIR"], plain["BATCH_NAME"]) == (
        "preprocess",
        "train_local",
        "batch",
    )
    assert (plain["RUN_ID"], plain["DAG_ID"], plain["TASK_ID"]) == (
        "manual__2026-01-01",
        "jipfed_site",
        "train_local",
    )
    assert (plain["JIPFED_MODEL_IN_DIR"], plain["JIPFED_EVALUATE"]) == ("get_global_model", "1")
    site = json.loads(plain["JIPFED_SITE"])
    assert site["data_root"] == "/kaapana/mounted/data/jipfed" and "execution" not in site
    assert SiteIdentity.from_dict(site).run_dir("manual__2026-01-01") == Path(run_dir)
    assert json.loads(plain["JIPFED_WORK"]) == work_data
    assert refs == {}  # training talks to no service: no connection, no secret
    assert "JIPFED_PACS_CONN" not in plain and "JIPFED_CENTRAL_CONN" not in plain


def test_data_and_upload_pods_have_no_gpu_and_secrets_by_reference_only(
    connections: None, work_data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fetch = site_pod("fetch_dicom", identity(), work_data, monkeypatch)
    [container] = fetch["spec"]["containers"]
    assert container["args"] == ["task", "fetch"]
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "6Gi"}}
    assert not fetch["spec"].get("nodeSelector") and not fetch["spec"].get("tolerations")
    plain, refs = env_of(container)
    assert refs == {
        "JIPFED_PACS_PASSWORD": {"name": "jipfed-site", "key": "pacs-password", "optional": False}
    }
    pacs = json.loads(plain["JIPFED_PACS_CONN"])
    assert (pacs["host"], pacs["login"], pacs["conn_type"]) == ("http://pacs:8042", "u", "jipfed_pacs")
    assert "password" not in pacs and PACS_PASSWORD not in json.dumps(fetch)

    upload = site_pod("upload_update", identity(), work_data, monkeypatch)
    [container] = upload["spec"]["containers"]
    plain, refs = env_of(container)
    assert refs == {
        "JIPFED_CENTRAL_TOKEN": {"name": "jipfed-site", "key": "central-token", "optional": False}
    }
    assert json.loads(plain["JIPFED_CENTRAL_CONN"])["host"] == "https://central.example/jipfed"
    assert CENTRAL_TOKEN not in json.dumps(upload) and "nvidia.com/gpu" not in json.dumps(upload)


def test_a_password_without_a_secret_reference_never_reaches_a_pod(
    connections: None, work_data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ident = identity(secrets={})
    with pytest.raises(
        AirflowFailException, match=r"execution.secrets.pacs_password names no Kubernetes Secret"
    ):
        site_pod("convert", ident, work_data, monkeypatch)


def test_paths_off_the_data_volume_are_refused(
    connections: None, work_data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ident = SiteIdentity.from_dict({"site_id": SITE, "data_root": "/srv/jipfed", "execution": execution()})
    with pytest.raises(
        AirflowFailException, match=r"data_root '/srv/jipfed' is not on the volume 'workflow-data-pv-claim'"
    ):
        site_pod("preprocess", ident, work_data, monkeypatch)


def test_aggregate_pod_reads_the_store_secret_by_reference(
    connections: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    dag = load_dag_file("jipfed_central", monkeypatch).jipfed_central()  # the @dag function builds the DAG
    assert isinstance(dag, DAG)
    task = dag.get_task("close_step")  # aggregates the step, in a pod here
    settings = CentralSettings.from_dict(
        {"workflow_dir": "/kaapana/mounted/workflows/data/jipfed-central", "execution": execution()}
    )
    task.experiment = "exp1"  # as rendered from the run's params
    pod = render(task.pod_for(settings, "manual__2026-01-01", 3))
    [container] = pod["spec"]["containers"]
    assert container["args"] == ["task", "aggregate"] and "nvidia.com/gpu" not in json.dumps(container)
    plain, refs = env_of(container)
    assert plain["WORKFLOW_DIR"] == "/kaapana/mounted/data/jipfed-central/manual__2026-01-01"
    assert (plain["JIPFED_EXPERIMENT"], plain["JIPFED_STEP"], plain["JIPFED_DISPATCH_NEXT"]) == (
        "exp1",
        "3",
        "0",  # close_step opens the next step itself (pushed or pulled) after the pod
    )
    assert refs == {
        "JIPFED_STORE_SECRET_KEY": {"name": "jipfed-central", "key": "secret-key", "optional": False}
    }
    assert json.loads(plain["JIPFED_STORE_CONN"])["extra"]["endpoint_url"] == "http://minio:9000"
    assert STORE_SECRET not in json.dumps(pod)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"mode": "pod", "volumes": {"data": {"claim": "x"}}}, "execution.image is required"),
        ({"mode": "pod", "image": IMAGE}, "execution.volumes.data is required"),
        ({"mode": "pods"}, "execution.mode must be one of"),
        ({"gpus": 1}, r"unknown key\(s\) \['gpus'\]"),
        (
            {"resources": {"limits": {"memory": "lots"}}},
            "execution.resources.limits.memory: 'lots' is not a Kubernetes quantity",
        ),
        ({"steps": {"training": {}}}, r"execution.steps: unknown key\(s\) \['training'\]"),
        ({"steps": {"train": {"gpu": -1}}}, "execution.steps.train.gpu must be an integer >= 0"),
        (
            {"secrets": {"central_token": {"name": "Bad_Name", "key": "k"}}},
            "must be a Kubernetes object name",
        ),
        ({"pod_steps": ["fetch", "upload_update"]}, r"unknown step\(s\) \['upload_update'\]"),
    ],
)
def test_execution_config_errors_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExecutionConfig.from_dict(data)


# -- failure messages, on V1Pod objects in the states Kubernetes reports ------------------------------


def pod_in(state: k8s.V1ContainerState | None = None, *, phase: str = "Failed", **status: Any) -> k8s.V1Pod:
    container = k8s.V1Container(
        name="base",
        image=IMAGE,
        resources=k8s.V1ResourceRequirements(requests={"memory": "2Gi"}, limits={"memory": "6Gi"}),
    )
    statuses = [
        k8s.V1ContainerStatus(
            name="base", image=IMAGE, image_id="", ready=False, restart_count=0, state=state
        )
    ]
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="jipfed-train-abc", namespace="jipfed"),
        spec=k8s.V1PodSpec(containers=[container]),
        status=k8s.V1PodStatus(phase=phase, container_statuses=statuses if state else None, **status),
    )


def terminated(code: int, reason: str, message: str | None = None) -> k8s.V1ContainerState:
    return k8s.V1ContainerState(
        terminated=k8s.V1ContainerStateTerminated(exit_code=code, reason=reason, message=message)
    )


def waiting(reason: str, message: str) -> k8s.V1ContainerState:
    return k8s.V1ContainerState(waiting=k8s.V1ContainerStateWaiting(reason=reason, message=message))


def test_oom_killed_names_the_limit_and_the_setting() -> None:
    message = pod_failure_message(pod_in(terminated(137, "OOMKilled")), "train")
    assert message is not None and message.startswith("step 'train': pod jipfed-train-abc was OOM-killed")
    assert "limits {'memory': '6Gi'}" in message and "execution.steps.train.resources" in message


def test_pods_that_cannot_start_say_why() -> None:
    pull = pod_in(waiting("ImagePullBackOff", "Back-off pulling image"), phase="Pending")
    assert f"image {IMAGE!r} cannot be pulled (ImagePullBackOff" in str(pod_failure_message(pull, "fetch"))
    secret = pod_in(waiting("CreateContainerConfigError", 'secret "jipfed-site" not found'), phase="Pending")
    text = str(pod_failure_message(secret, "fetch"))
    assert 'secret "jipfed-site" not found' in text and "execution.secrets" in text
    unschedulable = pod_in(
        phase="Pending",
        conditions=[
            k8s.V1PodCondition(
                type="PodScheduled",
                status="False",
                reason="Unschedulable",
                message="0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            )
        ],
    )
    text = str(pod_failure_message(unschedulable, "train"))
    assert (
        "cannot be scheduled (Unschedulable): 0/3 nodes are available: 3 Insufficient nvidia.com/gpu." in text
    )
    assert "requests {'memory': '2Gi'}" in text


def test_exit_codes_carry_the_task_message() -> None:
    pod = pod_in(terminated(3, "Error", "jipfed task convert: site 'site-a': no case could be converted"))
    assert pod_failure_message(pod, "convert") == (
        "step 'convert': pod jipfed-train-abc: jipfed task convert exited with code 3 (failed for good): "
        "jipfed task convert: site 'site-a': no case could be converted"
    )
    assert pod_failure_message(pod_in(terminated(0, "Completed"), phase="Succeeded"), "convert") is None


def test_the_pod_operator_raises_the_clear_message() -> None:
    """What ``JipfedPodOperator.cleanup`` raises after the provider's cleanup failed (needs a cluster itself)."""
    oom = clear_failure(pod_in(terminated(137, "OOMKilled")), "train")
    assert type(oom) is AirflowException and "was OOM-killed" in str(oom)  # a retry with more memory may pass
    final = clear_failure(pod_in(terminated(3, "Error", "no data")), "convert")
    assert isinstance(final, AirflowFailException) and str(final).endswith("(failed for good): no data")
    assert isinstance(
        clear_failure(pod_in(terminated(2, "Error", "JIPFED_WORK is not set")), "fetch"), AirflowFailException
    )
    assert clear_failure(pod_in(terminated(0, "Completed"), phase="Succeeded"), "fetch") is None


def test_exit_126_is_a_skip_for_the_provider(
    work_data: dict[str, Any], connections: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = load_dag_file("jipfed_site", monkeypatch)
    task = module.jipfed_site.get_task("upload_update")
    ident = identity()
    run = make_run(
        ident,
        ident.run_dir("r1"),
        operator_in_dir="train_local",
        operator_out_dir="upload_update",
        work_data=work_data,
    )
    operator = task.pod_for(run, "r1")
    assert isinstance(operator, pod_operator_class()) and list(operator.skip_on_exit_code) == [126]
    assert operator.on_finish_action.value == "delete_pod" and operator.startup_timeout_seconds == 300


def test_paths_translate_between_airflow_and_the_pod() -> None:
    volume = ExecutionConfig.from_dict(execution()).data_volume
    assert volume is not None
    pod_path = volume.pod_path(
        "/kaapana/mounted/workflows/data/jipfed/workflows/r1/fetch_dicom/fetch.json", "x"
    )
    assert pod_path == "/kaapana/mounted/data/jipfed/workflows/r1/fetch_dicom/fetch.json"
    assert (
        volume.from_pod(pod_path)
        == "/kaapana/mounted/workflows/data/jipfed/workflows/r1/fetch_dicom/fetch.json"
    )
    assert volume.from_pod("/tmp/elsewhere") == "/tmp/elsewhere"
    with pytest.raises(ValueError, match="is not on the volume"):
        volume.pod_path("/kaapana/mounted/workflows/database", "x")  # a sibling, not below it
