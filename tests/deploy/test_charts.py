"""The Kaapana extension charts: render, lint, validate against the Kubernetes schemas, and assert
what a hospital's cluster relies on (resources, GPU only when asked for, non-root, pinned images,
secrets only by reference). Kaapana's dag-installer-chart is replaced by a test-only stand-in
(tests/deploy/fixtures/dag-installer-chart) that keeps its values contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from jipfed.packaging.charts import CHARTS, stage_chart
from jipfed.tasks.execution import SECRET_ENV, CentralSettings, ExecutionConfig
from jipfed.tasks.identity import parse_identity
from tests.deploy.conftest import REPO

DAG_INSTALLER = Path(__file__).parent / "fixtures" / "dag-installer-chart"
KUBERNETES_VERSION = "1.30"
SECRET = "s3cr3t-DO-NOT-LEAK-7f3a9c"
PLATFORM = {"global": {"registry_url": "registry.hospital.local/kaapana", "version": "0.6.0"}}
ROLE_VALUES: dict[str, dict[str, Any]] = {
    "jipfed-site-workflow": {
        **PLATFORM,
        "site": {"id": "site-a"},
        "endpoints": {"central": {"url": "https://central.example.org/jipfed"}},
    },
    "jipfed-central-workflow": PLATFORM,
}
GPU = {
    "gpu": {
        "enabled": True,
        "count": 2,
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
}


def merged(*parts: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of values dicts (later wins)."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture(scope="module")
def charts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("charts")
    return {name: stage_chart(name, DAG_INSTALLER, root) for name in CHARTS}


def render(chart: Path, values: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Template path -> its manifests."""
    out = helm.Chart.load(chart).render(values, name="jipfed", namespace="jipfed")
    return {path: [doc for doc in yaml.safe_load_all(text) if doc] for path, text in out.items()}


def manifests(chart: Path, values: dict[str, Any], *, ours: bool = False) -> list[dict[str, Any]]:
    """All rendered manifests (``ours``: without the dag-installer subchart's)."""
    return [
        doc for path, docs in render(chart, values).items()
        if not (ours and "/charts/" in path) for doc in docs
    ]


def pod_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    specs = []
    for doc in docs:
        if doc["kind"] == "Pod":
            specs.append(doc["spec"])
        elif doc["kind"] == "Job":
            specs.append(doc["spec"]["template"]["spec"])
    return specs


def airflow_config(chart: Path, values: dict[str, Any]) -> dict[str, str]:
    (config,) = [d for d in manifests(chart, values, ours=True) if d["kind"] == "ConfigMap"]
    return config["data"]


@pytest.mark.parametrize("name", CHARTS)
def test_chart_is_a_kaapana_workflow_extension(name: str) -> None:
    chart = REPO / "helm" / name
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v1" and "kaapanaworkflow" in meta["keywords"]
    (dependency,) = yaml.safe_load((chart / "requirements.yaml").read_text())["dependencies"]
    assert dependency["name"] == "dag-installer-chart"
    values = yaml.safe_load((chart / "values.yaml").read_text())
    installer = (REPO / "containers" / "installer" / "Dockerfile").read_text()
    assert f'IMAGE="{values["global"]["image"]}"' in installer, "global.image must name the installer image"
    assert values["global"]["action"] == "copy"


@pytest.mark.parametrize("name", CHARTS)
@pytest.mark.parametrize("gpu", [False, True])
def test_lints_strict(name: str, gpu: bool, charts: dict[str, Path]) -> None:
    report = helm.lint(charts[name], merged(ROLE_VALUES[name], GPU if gpu else {}), strict=True,
                       with_subcharts=True, kube_version=f"v{KUBERNETES_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [] and report["errors"] == [], report


@pytest.mark.parametrize("name", CHARTS)
@pytest.mark.parametrize("gpu", [False, True])
def test_every_manifest_validates_against_the_kubernetes_schema(name: str, gpu: bool, charts: dict[str, Path]) -> None:
    docs = manifests(charts[name], merged(ROLE_VALUES[name], GPU if gpu else {}))
    assert sorted(doc["kind"] for doc in docs) == ["ConfigMap", "Job", "Pod"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_schema_check_rejects_a_broken_manifest(charts: dict[str, Path]) -> None:
    """The validation above can fail: a typo in a pod field is caught."""
    name = "jipfed-site-workflow"
    (pod,) = [d for d in manifests(charts[name], ROLE_VALUES[name]) if d["kind"] == "Pod"]
    pod["spec"]["containers"][0]["resource"] = pod["spec"]["containers"][0].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", CHARTS)
def test_pods_request_and_limit_cpu_and_memory(name: str, charts: dict[str, Path]) -> None:
    for spec in pod_specs(manifests(charts[name], ROLE_VALUES[name])):
        for container in spec["containers"]:
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), (name, container["name"], kind)


@pytest.mark.parametrize("name", CHARTS)
def test_gpu_only_when_enabled(name: str, charts: dict[str, Path]) -> None:
    chart = charts[name]
    plain = manifests(chart, ROLE_VALUES[name], ours=True)
    assert "nvidia.com/gpu" not in json.dumps(plain)
    (spec,) = pod_specs(plain)
    assert "nodeSelector" not in spec and "tolerations" not in spec

    with_gpu = manifests(chart, merged(ROLE_VALUES[name], GPU), ours=True)
    (spec,) = pod_specs(with_gpu)
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert spec["nodeSelector"] == GPU["gpu"]["nodeSelector"]
    assert spec["tolerations"] == GPU["gpu"]["tolerations"]


def execution_config(chart: Path, values: dict[str, Any]) -> ExecutionConfig:
    """The execution config of the role's Variable, parsed by the suite itself."""
    data = airflow_config(chart, values)
    if "AIRFLOW_VAR_JIPFED_SITE" in data:
        return parse_identity("chart", data["AIRFLOW_VAR_JIPFED_SITE"]).execution
    return CentralSettings.from_dict(json.loads(data["AIRFLOW_VAR_JIPFED_CENTRAL"])).execution


@pytest.mark.parametrize(("name", "step"), [("jipfed-site-workflow", "train"),
                                            ("jipfed-central-workflow", "aggregate")])
def test_the_gpu_goes_to_one_step(name: str, step: str, charts: dict[str, Path]) -> None:
    assert execution_config(charts[name], ROLE_VALUES[name]).settings(step).gpu == 0
    execution = execution_config(charts[name], merged(ROLE_VALUES[name], GPU))
    assert execution.settings(step).gpu == 2
    assert dict(execution.settings(step).node_selector) == GPU["gpu"]["nodeSelector"]
    others = [s for s in execution.pod_steps if s != step]
    assert others and all(execution.settings(s).gpu == 0 for s in others), f"only {step} asks for a GPU"


@pytest.mark.parametrize("name", CHARTS)
def test_pods_run_as_non_root(name: str, charts: dict[str, Path]) -> None:
    for spec in pod_specs(manifests(charts[name], ROLE_VALUES[name], ours=True)):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] > 0
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("name", CHARTS)
def test_images_are_pinned(name: str, charts: dict[str, Path]) -> None:
    for spec in pod_specs(manifests(charts[name], ROLE_VALUES[name])):
        for container in spec["containers"]:
            image = container["image"]
            tag = image.rpartition(":")[2]
            assert "/" not in tag and tag not in ("", "latest"), image
    for tag in ("latest", ""):
        with pytest.raises(helm.HelmError, match="image.tag"):
            render(charts[name], merged(ROLE_VALUES[name], {"image": {"tag": tag}}))


@pytest.mark.parametrize("name", CHARTS)
def test_secrets_only_by_reference(name: str, charts: dict[str, Path]) -> None:
    """Secret-looking values put where a careless template would copy them never reach a manifest."""
    all_secrets = {key: {"name": "jipfed-secrets", "key": key.replace("_", "-"), "value": SECRET}
                   for key in SECRET_ENV}
    careless = {
        "secrets": all_secrets,
        "endpoints": {"central": {"token": SECRET}, "pacs": {"password": SECRET},
                      "modelStore": {"secretKey": SECRET}},
        "image": {"password": SECRET},
        "execution": {"token": SECRET},
    }
    docs = manifests(charts[name], merged(ROLE_VALUES[name], careless), ours=True)
    assert SECRET not in json.dumps(docs)
    (spec,) = pod_specs(docs)
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    for key, env_name in SECRET_ENV.items():
        assert env[env_name] == {"name": env_name, "valueFrom": {"secretKeyRef": {
            "name": "jipfed-secrets", "key": key.replace("_", "-")}}}, env_name
    assert all("value" not in e for e in env.values()), "secrets only, as references"


def test_an_unknown_secret_is_refused(charts: dict[str, Path]) -> None:
    name = "jipfed-site-workflow"
    with pytest.raises(helm.HelmError, match="secrets.pacs_pasword is not a known secret"):
        render(charts[name], merged(ROLE_VALUES[name], {"secrets": {"pacs_pasword": {"name": "x", "key": "y"}}}))


def test_site_identity_variable_is_what_the_suite_reads(charts: dict[str, Path]) -> None:
    name = "jipfed-site-workflow"
    values = merged(ROLE_VALUES[name], {"secrets": {"pacs_password": {"name": "pacs", "key": "pw"}}})
    data = airflow_config(charts[name], values)
    identity = parse_identity("Airflow Variable 'jipfed_site'", data["AIRFLOW_VAR_JIPFED_SITE"])
    assert identity.site_id == "site-a"
    assert json.loads(data["variables.json"]) == {"jipfed_site": json.loads(data["AIRFLOW_VAR_JIPFED_SITE"])}
    execution = identity.execution
    assert execution.mode == "pod" and execution.image == "jipfed-worker:0.1.0"
    assert execution.data_volume.pod_path(str(identity.data_root), "data_root") == "/kaapana/mounted/data/jipfed"
    assert {k: (v.name, v.key) for k, v in execution.secrets.items()} == {
        "central_token": ("jipfed-site", "central-token"), "pacs_password": ("pacs", "pw")}
    connections = json.loads(data["connections.json"])
    assert connections["jipfed_central_default"] == {"conn_type": "http", "host": "https://central.example.org/jipfed"}
    assert connections["jipfed_pacs_default"]["conn_type"] == "jipfed_pacs"


def test_central_settings_variable_is_what_the_suite_reads(charts: dict[str, Path]) -> None:
    name = "jipfed-central-workflow"
    data = airflow_config(charts[name], ROLE_VALUES[name])
    settings = CentralSettings.from_dict(json.loads(data["AIRFLOW_VAR_JIPFED_CENTRAL"]))
    assert settings.execution.runs_in_pod("aggregate")
    assert settings.workflow_dir == "/kaapana/mounted/workflows/data/jipfed-central"
    assert json.loads(data["connections.json"])["jipfed_model_store_default"]["conn_type"] == "aws"


def test_site_id_is_required(charts: dict[str, Path]) -> None:
    name = "jipfed-site-workflow"
    with pytest.raises(helm.HelmError, match="site.id is required"):
        render(charts[name], merged(ROLE_VALUES[name], {"site": {"id": ""}}))


def test_dag_installer_job_runs_our_installer_image(charts: dict[str, Path]) -> None:
    name = "jipfed-site-workflow"
    (job,) = [d for d in manifests(charts[name], ROLE_VALUES[name]) if d["kind"] == "Job"]
    image = job["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.hospital.local/kaapana/jipfed-installer:0.6.0"


def test_official_airflow_chart_values_for_the_central() -> None:
    """helm/airflow-values/central.yaml (the official chart cannot be fetched here: the keys were
    checked once against its values.schema.json; this checks what our suite and Kubernetes need)."""
    values = yaml.safe_load((REPO / "helm" / "airflow-values" / "central.yaml").read_text())
    assert values["executor"] == "KubernetesExecutor"
    dockerfile = (REPO / "containers" / "airflow" / "Dockerfile").read_text()
    assert f"ARG AIRFLOW_VERSION={values['airflowVersion']}\n" in dockerfile, "chart and image must agree"
    assert values["images"]["airflow"]["tag"] not in ("", "latest")

    assert all(set(item) == {"name", "value"} for item in values["env"])
    env = {item["name"]: item["value"] for item in values["env"]}
    settings = CentralSettings.from_dict(json.loads(env["AIRFLOW_VAR_JIPFED_CENTRAL"]))
    assert settings.execution.runs_in_pod("aggregate")
    assert settings.execution.data_volume.pod_path(settings.workflow_dir, "workflow_dir").startswith(
        settings.execution.data_volume.mount_path)
    assert not any(word in name for name in env for word in ("SECRET", "PASSWORD", "TOKEN", "AIRFLOW_CONN_"))
    assert all(set(item) == {"envName", "secretName", "secretKey"} for item in values["secret"])

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "airflow-worker"},
           "spec": {"securityContext": values["securityContexts"]["pod"], "volumes": values["volumes"],
                    "containers": [{"name": "base", "image": "x:1", "volumeMounts": values["volumeMounts"],
                                    "securityContext": values["securityContexts"]["container"],
                                    "resources": values["workers"]["resources"]}]}}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    claims = {v["persistentVolumeClaim"]["claimName"] for v in values["volumes"]}
    assert settings.execution.data_volume.claim in claims
    for component in ("scheduler", "apiServer", "dagProcessor", "triggerer", "workers"):
        assert {"requests", "limits"} <= set(values[component]["resources"]), component
