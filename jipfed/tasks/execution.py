"""Where a heavy step runs: in the Airflow task process, or as a Kubernetes pod (configuration only).

A site sets it as the ``execution`` key of its identity Variable ``jipfed_site``; the central in the
Variable ``jipfed_central`` (``{"execution": {...}}``). The DAG files never change. See
``docs/pod-contract.md`` for the full example; the keys::

    {"mode": "pod",                                  # default "in_process"
     "image": "registry.example/jipfed-worker:0.1.0",
     "namespace": "jipfed",                          # default: the Kubernetes connection's
     "pod_steps": ["cohort", "fetch", "convert", "preprocess", "model", "train", "upload", "aggregate"],
     "resources": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "8Gi"}},
     "gpu": 0, "node_selector": {}, "tolerations": [],
     "steps": {"train": {"gpu": 1, "resources": {...}, "node_selector": {...}, "tolerations": [...]}},
     "volumes": {"data": {"claim": "workflow-data-pv-claim", "mount_path": "/kaapana/mounted/data",
                          "airflow_path": "/kaapana/mounted/workflows/data"},
                 "models": {"claim": "models-pv-claim", "mount_path": "/models"}},
     "secrets": {"pacs_password": {"name": "jipfed-site", "key": "pacs-password"},
                 "central_token": {"name": "jipfed-site", "key": "central-token"}},
     "service_account": null, "image_pull_secrets": [], "image_pull_policy": null,
     "startup_timeout_s": 300}

No Airflow or Kubernetes import here: ``jipfed.operators.pod`` turns this into a pod.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any

MODES = ("in_process", "pod")
#: Steps ``jipfed task`` runs (site and central).
SITE_STEPS = ("cohort", "fetch", "convert", "preprocess", "model", "train", "upload")
CENTRAL_STEPS = ("aggregate",)
STEPS = SITE_STEPS + CENTRAL_STEPS
#: The steps that go to a pod in pod mode unless ``pod_steps`` says otherwise: all of them, so that
#: Airflow's own workers need neither torch nor the DICOM stack for them.
DEFAULT_POD_STEPS = STEPS
#: Secrets a pod may need: config name -> the environment variable ``jipfed task`` reads.
SECRET_ENV = {
    "pacs_password": "JIPFED_PACS_PASSWORD",
    "central_token": "JIPFED_CENTRAL_TOKEN",
    "store_secret_key": "JIPFED_STORE_SECRET_KEY",
}
RESOURCE_NAMES = ("cpu", "memory", "ephemeral-storage")
DEFAULT_RESOURCES = {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "8Gi"}}
TOLERATION_KEYS = ("key", "operator", "value", "effect", "toleration_seconds")
KAAPANA_DATA_MOUNT = "/kaapana/mounted/data"
KAAPANA_MODELS_MOUNT = "/models"
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def _check_keys(data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {data!r}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(allowed)}")


def _k8s_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _K8S_NAME.match(value):
        raise ValueError(
            f"{where} must be a Kubernetes object name (lower case, digits, '-', '.'), got {value!r}"
        )
    return value


def _resources(data: Any, where: str) -> dict[str, dict[str, str]]:
    _check_keys(data, ("requests", "limits"), where)
    out: dict[str, dict[str, str]] = {}
    for kind, values in data.items():
        _check_keys(values, RESOURCE_NAMES, f"{where}.{kind}")
        for name, value in values.items():
            text = str(value)
            if isinstance(value, bool) or not _QUANTITY.match(text):
                raise ValueError(
                    f"{where}.{kind}.{name}: {value!r} is not a Kubernetes quantity (e.g. '2', '500m', '8Gi')"
                )
        out[kind] = {name: str(value) for name, value in values.items()}
    return out


def _tolerations(data: Any, where: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(data, Sequence) or isinstance(data, str):
        raise ValueError(f"{where} must be a list of objects, got {data!r}")
    for i, item in enumerate(data):
        _check_keys(item, TOLERATION_KEYS, f"{where}[{i}]")
    return tuple(dict(item) for item in data)


def _string_map(data: Any, where: str) -> dict[str, str]:
    if not isinstance(data, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise ValueError(f"{where} must be an object of strings, got {data!r}")
    return dict(data)


def _gpu(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} must be an integer >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class PodSettings:
    """What one step's pod asks for: CPU / memory, GPUs, and where it may be scheduled."""

    resources: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: DEFAULT_RESOURCES)
    gpu: int = 0
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()

    def updated(self, data: Mapping[str, Any], where: str) -> PodSettings:
        """These settings with the keys in ``data`` replaced (validated)."""
        _check_keys(data, ("resources", "gpu", "node_selector", "tolerations"), where)
        changes: dict[str, Any] = {}
        if "resources" in data:
            changes["resources"] = _resources(data["resources"], f"{where}.resources")
        if "gpu" in data:
            changes["gpu"] = _gpu(data["gpu"], f"{where}.gpu")
        if "node_selector" in data:
            changes["node_selector"] = _string_map(data["node_selector"], f"{where}.node_selector")
        if "tolerations" in data:
            changes["tolerations"] = _tolerations(data["tolerations"], f"{where}.tolerations")
        return replace(self, **changes)


@dataclass(frozen=True)
class Volume:
    """A PVC mounted into the pod at ``mount_path``; Airflow sees it at ``airflow_path``."""

    claim: str
    mount_path: str
    airflow_path: str

    @classmethod
    def from_dict(cls, data: Any, where: str, default_mount: str) -> Volume:
        _check_keys(data, ("claim", "mount_path", "airflow_path"), where)
        claim = _k8s_name(data.get("claim"), f"{where}.claim")
        mount = str(data.get("mount_path") or default_mount)
        airflow_path = str(data.get("airflow_path") or mount)
        for name, path in (("mount_path", mount), ("airflow_path", airflow_path)):
            if not PurePosixPath(path).is_absolute():
                raise ValueError(f"{where}.{name} must be an absolute path, got {path!r}")
        return cls(claim, mount, airflow_path)

    def pod_path(self, path: str, what: str) -> str:
        """``path`` (as Airflow sees it) as the pod sees it; ValueError when it is not on this volume."""
        relative = PurePosixPath(path)
        base = PurePosixPath(self.airflow_path)
        if relative != base and base not in relative.parents:
            raise ValueError(
                f"{what} {path!r} is not on the volume {self.claim!r} (seen by Airflow at {self.airflow_path!r}): "
                "a pod could not read it; put it below that folder or set volumes.data.airflow_path"
            )
        return str(PurePosixPath(self.mount_path) / relative.relative_to(base))

    def from_pod(self, path: str) -> str:
        """A path the pod reported, as Airflow sees it (unchanged when it is not on this volume)."""
        pod_path, mount = PurePosixPath(path), PurePosixPath(self.mount_path)
        if pod_path != mount and mount not in pod_path.parents:
            return path
        return str(PurePosixPath(self.airflow_path) / pod_path.relative_to(mount))


@dataclass(frozen=True)
class SecretRef:
    """A key of an existing Kubernetes Secret (the value never appears in configuration)."""

    name: str
    key: str


@dataclass(frozen=True)
class ExecutionConfig:
    """Where the heavy steps run, and what their pods look like (see the module docstring)."""

    mode: str = "in_process"
    image: str | None = None
    namespace: str | None = None
    pod_steps: tuple[str, ...] = DEFAULT_POD_STEPS
    defaults: PodSettings = field(default_factory=PodSettings)
    steps: Mapping[str, PodSettings] = field(default_factory=dict)
    data_volume: Volume | None = None
    models_volume: Volume | None = None
    secrets: Mapping[str, SecretRef] = field(default_factory=dict)
    service_account: str | None = None
    image_pull_secrets: tuple[str, ...] = ()
    image_pull_policy: str | None = None
    startup_timeout_s: int = 300

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"execution.mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "pod":
            if not isinstance(self.image, str) or not self.image.strip():
                raise ValueError(
                    "execution.image is required in pod mode (the worker image, with a pinned tag)"
                )
            if self.data_volume is None:
                raise ValueError(
                    "execution.volumes.data is required in pod mode (the run folders and caches)"
                )

    def runs_in_pod(self, step: str) -> bool:
        """Whether ``step`` runs as a pod."""
        return self.mode == "pod" and step in self.pod_steps

    def settings(self, step: str) -> PodSettings:
        """The pod settings of ``step`` (its ``steps`` entry, else the defaults)."""
        return self.steps.get(step, self.defaults)

    @classmethod
    def from_dict(cls, data: Any) -> ExecutionConfig:
        """Build from the ``execution`` JSON object; ValueError naming the bad key."""
        where = "execution"
        _check_keys(
            data,
            (
                "mode",
                "image",
                "namespace",
                "pod_steps",
                "resources",
                "gpu",
                "node_selector",
                "tolerations",
                "steps",
                "volumes",
                "secrets",
                "service_account",
                "image_pull_secrets",
                "image_pull_policy",
                "startup_timeout_s",
            ),
            where,
        )
        pod_keys = ("resources", "gpu", "node_selector", "tolerations")
        defaults = PodSettings().updated({k: data[k] for k in pod_keys if k in data}, where)
        steps_data = data.get("steps", {})
        _check_keys(steps_data, STEPS, f"{where}.steps")
        steps = {name: defaults.updated(value, f"{where}.steps.{name}") for name, value in steps_data.items()}
        pod_steps = tuple(data.get("pod_steps", DEFAULT_POD_STEPS))
        unknown = sorted(set(pod_steps) - set(STEPS))
        if unknown:
            raise ValueError(f"{where}.pod_steps: unknown step(s) {unknown}; known: {list(STEPS)}")
        volumes = data.get("volumes", {})
        _check_keys(volumes, ("data", "models"), f"{where}.volumes")
        secrets_data = data.get("secrets", {})
        _check_keys(secrets_data, tuple(SECRET_ENV), f"{where}.secrets")
        secrets = {}
        for name, ref in secrets_data.items():
            _check_keys(ref, ("name", "key"), f"{where}.secrets.{name}")
            key = ref.get("key")
            if not isinstance(key, str) or not re.match(r"^[-._a-zA-Z0-9]+$", key):
                raise ValueError(f"{where}.secrets.{name}.key must be a Secret key, got {key!r}")
            secrets[name] = SecretRef(_k8s_name(ref.get("name"), f"{where}.secrets.{name}.name"), key)
        timeout = data.get("startup_timeout_s", 300)
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
            raise ValueError(f"{where}.startup_timeout_s must be an integer > 0, got {timeout!r}")
        pull_secrets = data.get("image_pull_secrets", [])
        if not isinstance(pull_secrets, list):
            raise ValueError(
                f"{where}.image_pull_secrets must be a list of Secret names, got {pull_secrets!r}"
            )
        return cls(
            mode=data.get("mode", "in_process"),
            image=data.get("image"),
            namespace=None
            if data.get("namespace") is None
            else _k8s_name(data["namespace"], f"{where}.namespace"),
            pod_steps=pod_steps,
            defaults=defaults,
            steps=steps,
            data_volume=None
            if "data" not in volumes
            else Volume.from_dict(volumes["data"], f"{where}.volumes.data", KAAPANA_DATA_MOUNT),
            models_volume=None
            if "models" not in volumes
            else Volume.from_dict(volumes["models"], f"{where}.volumes.models", KAAPANA_MODELS_MOUNT),
            secrets=secrets,
            service_account=data.get("service_account"),
            image_pull_secrets=tuple(_k8s_name(s, f"{where}.image_pull_secrets") for s in pull_secrets),
            image_pull_policy=data.get("image_pull_policy"),
            startup_timeout_s=timeout,
        )


@dataclass(frozen=True)
class CentralSettings:
    """The central's deployment settings, the JSON of the Airflow Variable ``jipfed_central``::

        {"workflow_dir": "/kaapana/mounted/workflows/data/jipfed-central",   # run folders (pod mode)
         "execution": {...}}                                                # as a site's

    Absent Variable: everything runs in-process.
    """

    workflow_dir: str | None = None
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    def __post_init__(self) -> None:
        if self.execution.mode == "pod" and not self.workflow_dir:
            raise ValueError("workflow_dir is required in pod mode (run folders on the data volume)")
        if self.workflow_dir is not None and not PurePosixPath(self.workflow_dir).is_absolute():
            raise ValueError(f"workflow_dir must be an absolute path, got {self.workflow_dir!r}")

    @classmethod
    def from_dict(cls, data: Any) -> CentralSettings:
        _check_keys(data, ("workflow_dir", "execution"), "central settings")
        execution = data.get("execution")
        return cls(
            workflow_dir=data.get("workflow_dir"),
            execution=ExecutionConfig() if execution is None else ExecutionConfig.from_dict(execution),
        )
