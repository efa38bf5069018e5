"""Run a ``jipfed task <step>`` as a Kubernetes pod (cncf-kubernetes' KubernetesPodOperator).

The operators decide in ``execute()`` (the DAG is parsed before the configuration is known):
in-process, they call the step's function; in pod mode, :func:`launch` builds a
:class:`JipfedPodOperator` from the ``execution`` configuration (``jipfed.tasks.execution``) and
the pod environment (``jipfed.tasks.env``) and runs it through KubernetesPodOperator.execute. The
step's result comes back through the shared workflow-data volume (``task-result.json``).

What the pod gets: the worker image running ``jipfed task <step>``; CPU / memory requests and
limits; ``nvidia.com/gpu`` only when the step asks for GPUs; node selector and tolerations; the
workflow-data PVC (Kaapana: ``/kaapana/mounted/data``), the models PVC (``/models``) and a memory
``/dev/shm``; the env contract; secrets only as ``secretKeyRef`` (never a value); non-root.

Checked here without a cluster: the pod spec (``build_pod_request_obj``) and the failure messages
(:func:`pod_failure_message` on V1Pod objects). Not exercised here: creating and watching a pod on
a real cluster (no Kubernetes API on the build machine). The provider API used (constructor
arguments, ``execute``, ``cleanup``, ``pod_manager.read_pod``, ``skip_on_exit_code``) exists in
cncf-kubernetes 9.0.1 (Kaapana 0.6, Airflow 2.11) and 10.x (Airflow 3).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jipfed.operators.compat import AirflowException, AirflowFailException, AirflowSkipException, Context

from jipfed.tasks.connections import EnvConnection
from jipfed.tasks.env import CONNECTION_SECRET, CONNECTIONS, RESULT_FILE
from jipfed.tasks.errors import EXIT_FAILED, EXIT_RETRY, EXIT_SKIPPED, EXIT_USAGE
from jipfed.tasks.execution import ExecutionConfig, SecretRef

if TYPE_CHECKING:
    from kubernetes.client import models as k8s

#: The container name KubernetesPodOperator gives the pod's main container.
BASE_CONTAINER = "base"
EXIT_MEANINGS = {
    EXIT_RETRY: "failed, a retry may help",
    EXIT_USAGE: "bad configuration",
    EXIT_FAILED: "failed for good",
    EXIT_SKIPPED: "skipped",
}
PULL_ERRORS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
CONFIG_ERRORS = ("CreateContainerConfigError", "CreateContainerError")


def resources(execution: ExecutionConfig, step: str) -> k8s.V1ResourceRequirements:
    """Requests and limits of ``step``'s container; ``nvidia.com/gpu`` only when it asks for GPUs."""
    from kubernetes.client import models as k8s

    settings = execution.settings(step)
    requests = dict(settings.resources.get("requests", {}))
    limits = dict(settings.resources.get("limits", {}))
    if settings.gpu:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(settings.gpu)
    return k8s.V1ResourceRequirements(requests=requests or None, limits=limits or None)


def volumes(execution: ExecutionConfig) -> tuple[list[k8s.V1Volume], list[k8s.V1VolumeMount]]:
    """The workflow-data and models PVCs and a memory ``/dev/shm`` (PyTorch data loaders need it)."""
    from kubernetes.client import models as k8s

    vols, mounts = [], []
    for name, volume in (("workflow-data", execution.data_volume), ("models", execution.models_volume)):
        if volume is None:
            continue
        vols.append(
            k8s.V1Volume(
                name=name,
                persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=volume.claim),
            )
        )
        mounts.append(k8s.V1VolumeMount(name=name, mount_path=volume.mount_path))
    vols.append(k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory")))
    mounts.append(k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
    return vols, mounts


def env_vars(plain: Mapping[str, str], secrets: Mapping[str, SecretRef]) -> list[k8s.V1EnvVar]:
    """Plain variables by value, secrets only as references to a key of a Kubernetes Secret."""
    from kubernetes.client import models as k8s

    out = [k8s.V1EnvVar(name=name, value=value) for name, value in sorted(plain.items())]
    for name, ref in sorted(secrets.items()):
        selector = k8s.V1SecretKeySelector(name=ref.name, key=ref.key, optional=False)
        out.append(k8s.V1EnvVar(name=name, value_from=k8s.V1EnvVarSource(secret_key_ref=selector)))
    return out


def pod_labels(step: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "jipfed-worker",
        "app.kubernetes.io/part-of": "jipfed",
        "jipfed/step": step,
    }


def _describe_resources(pod: k8s.V1Pod) -> str:
    containers = pod.spec.containers if pod.spec and pod.spec.containers else []
    base = next((c for c in containers if c.name == BASE_CONTAINER), containers[0] if containers else None)
    res = base.resources if base is not None else None
    if res is None:
        return "no resources set"
    return f"requests {dict(res.requests or {})}, limits {dict(res.limits or {})}"


def pod_failure_message(pod: k8s.V1Pod, step: str) -> str | None:
    """Why ``pod`` failed or cannot start, in words a site admin can act on; None if no known cause.

    Reads the base container's state (OOMKilled, image pull errors, a missing Secret, the exit code
    of ``jipfed task`` and its termination message) and the pod's scheduling condition.
    """
    name = pod.metadata.name if pod.metadata else "?"
    head = f"step {step!r}: pod {name}"
    status = pod.status
    if status is None:
        return None
    statuses = [s for s in (status.container_statuses or []) if s.name == BASE_CONTAINER]
    for cs in statuses:
        terminated = (cs.state and cs.state.terminated) or (cs.last_state and cs.last_state.terminated)
        waiting = cs.state.waiting if cs.state else None
        if terminated is not None and terminated.reason == "OOMKilled":
            return (
                f"{head} was OOM-killed: the container used more memory than its limit ({_describe_resources(pod)}). "
                f"Raise execution.resources.limits.memory (or execution.steps.{step}.resources) in the Variable, "
                "or lower the batch size / patch size"
            )
        if waiting is not None and waiting.reason in PULL_ERRORS:
            return (
                f"{head} cannot start: image {cs.image!r} cannot be pulled ({waiting.reason}: {waiting.message}). "
                "Check execution.image, execution.image_pull_secrets and that the registry (or the offline "
                "mirror) holds that tag"
            )
        if waiting is not None and waiting.reason in CONFIG_ERRORS:
            return (
                f"{head} cannot start ({waiting.reason}): {waiting.message}. A Secret or key named in "
                "execution.secrets, or a PVC in execution.volumes, may be missing in the namespace"
            )
        if terminated is not None and terminated.exit_code:
            meaning = EXIT_MEANINGS.get(terminated.exit_code, terminated.reason or "error")
            detail = (terminated.message or "").strip() or "see the pod log above"
            return f"{head}: jipfed task {step} exited with code {terminated.exit_code} ({meaning}): {detail}"
    if status.reason == "Evicted":
        return f"{head} was evicted by the node: {status.message}"
    if status.phase == "Pending":
        for condition in status.conditions or []:
            if condition.type == "PodScheduled" and condition.status == "False":
                return (
                    f"{head} cannot be scheduled ({condition.reason}): {condition.message}. It asks for "
                    f"{_describe_resources(pod)}; check the node selector / tolerations, GPUs and free memory"
                )
        return f"{head} did not start (still Pending): {status.message or 'no reason given by Kubernetes'}"
    return None


def exit_code(pod: k8s.V1Pod | None) -> int | None:
    """The base container's exit code, if it terminated."""
    statuses = (pod.status.container_statuses or []) if pod is not None and pod.status else []
    for cs in statuses:
        if cs.name == BASE_CONTAINER and cs.state and cs.state.terminated:
            return cs.state.terminated.exit_code
    return None


def clear_failure(pod: k8s.V1Pod, step: str) -> AirflowException | None:
    """The exception to raise for a failed ``pod``: its clear message, failing for good on exit 2 or 3.

    None when the pod's state names no known cause (the provider's own error is kept then).
    """
    message = pod_failure_message(pod, step)
    if message is None:
        return None
    if exit_code(pod) in (EXIT_FAILED, EXIT_USAGE):
        return AirflowFailException(message)
    return AirflowException(message)


@cache
def pod_operator_class() -> type:
    """:class:`JipfedPodOperator` (built on first use: the provider is imported only in pod mode)."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    class JipfedPodOperator(KubernetesPodOperator):
        """KubernetesPodOperator whose failures say why (OOM, image, Secret, scheduling, exit code)."""

        step: str = "?"

        def cleanup(self, pod: Any, remote_pod: Any, *args: Any, **kwargs: Any) -> None:
            try:
                super().cleanup(pod, remote_pod, *args, **kwargs)
            except AirflowSkipException:
                raise
            except AirflowException as exc:
                current = remote_pod
                try:  # the pod as it is now (remote_pod may be from before it started)
                    current = self.pod_manager.read_pod(remote_pod or pod)
                except Exception:  # noqa: BLE001 - deleted or unreachable: keep what we have
                    self.log.debug("could not re-read pod %s", getattr(pod, "metadata", None))
                error = clear_failure(current, self.step) if current is not None else None
                if error is None:
                    raise
                raise error from exc

    JipfedPodOperator.__name__ = JipfedPodOperator.__qualname__ = "JipfedPodOperator"
    return JipfedPodOperator


def build_pod_operator(
    *,
    task_id: str,
    step: str,
    execution: ExecutionConfig,
    plain_env: Mapping[str, str],
    secret_env: Mapping[str, SecretRef],
) -> Any:
    """The JipfedPodOperator that runs ``jipfed task <step>`` as ``execution`` describes."""
    from kubernetes.client import models as k8s

    settings = execution.settings(step)
    vols, mounts = volumes(execution)
    operator = pod_operator_class()(
        task_id=task_id,
        name=f"jipfed-{step}",
        namespace=execution.namespace,
        image=execution.image,
        image_pull_policy=execution.image_pull_policy,
        image_pull_secrets=[k8s.V1LocalObjectReference(name=n) for n in execution.image_pull_secrets] or None,
        service_account_name=execution.service_account,
        cmds=["jipfed"],
        arguments=["task", step],
        env_vars=env_vars(plain_env, secret_env),
        container_resources=resources(execution, step),
        volumes=vols,
        volume_mounts=mounts,
        node_selector=dict(settings.node_selector) or None,
        tolerations=[
            k8s.V1Toleration(**{key: value for key, value in item.items()}) for item in settings.tolerations
        ]
        or None,
        labels=pod_labels(step),
        container_security_context=k8s.V1SecurityContext(
            run_as_non_root=True, allow_privilege_escalation=False
        ),
        startup_timeout_seconds=execution.startup_timeout_s,
        skip_on_exit_code=EXIT_SKIPPED,
        get_logs=True,
        log_events_on_failure=True,
        on_finish_action="delete_pod",
        do_xcom_push=False,
    )
    operator.step = step
    return operator


def read_result(out_dir: Path, where: str) -> Any:
    """The step's result the pod wrote to ``<out dir>/task-result.json`` (seen from Airflow)."""
    path = out_dir / RESULT_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise AirflowFailException(
            f"{where}: the pod finished but {path} does not exist: is the workflow-data volume "
            "(execution.volumes.data) the same one this Airflow worker sees at airflow_path?"
        ) from None


def launch(operator: Any, context: Context, out_dir: Path, where: str) -> Any:
    """Run the pod (KubernetesPodOperator.execute) and return the step's result."""
    try:
        operator.execute(context)
    except (AirflowException, AirflowSkipException):
        raise
    except Exception as exc:  # the Kubernetes API refused (no such namespace, RBAC, unreachable)
        raise AirflowException(
            f"{where}: cannot run step {operator.step!r} as a pod in namespace "
            f"{operator.namespace or '(the connection default)'}: {type(exc).__name__}: {exc}"
        ) from exc
    return read_result(out_dir, where)


def connection_env(
    conn: EnvConnection, name: str, execution: ExecutionConfig, *, where: str, step: str
) -> tuple[dict[str, str], dict[str, SecretRef]]:
    """The pod's variables for connection ``name``: its public JSON, and its secret as a reference.

    Raises:
        AirflowFailException: the connection has a secret and ``execution.secrets`` names no
            Kubernetes Secret for it, or it keeps a secret in its extra (secrets never go inline).
    """
    conn_var, secret_var = CONNECTIONS[name]
    secret_name = CONNECTION_SECRET[name]
    if "aws_secret_access_key" in conn.extra_dejson:
        raise AirflowFailException(
            f"{where}: Connection {conn.conn_id!r} keeps a secret key in its extra; put it in the password "
            "field so that a pod gets it only from a Kubernetes Secret"
        )
    plain = {conn_var: conn.public_json()}
    if not conn.password:
        return plain, {}
    ref = execution.secrets.get(secret_name)
    if ref is None:
        raise AirflowFailException(
            f"{where}: step {step!r} runs as a pod and Connection {conn.conn_id!r} has a password, but "
            f"execution.secrets.{secret_name} names no Kubernetes Secret holding it (secrets are never "
            "passed to a pod inline)"
        )
    return plain, {secret_var: ref}
