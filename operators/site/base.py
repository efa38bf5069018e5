"""What every site operator shares: the site identity, the work item, Kaapana-style run folders.

An operator reads from ``operator_in_dir`` (by default the ``operator_out_dir`` of its
``input_operator``) and returns the path of its main output as its XCom value (see
:mod:`jipfed.tasks.run` for the folder layout). The work item (the step to answer) is the XCom
value of ``work_task_id``. The caches (DICOM, NIfTI, preprocessed) live in the identity's
``data_root``, outside the run folder, and outlive it.

A heavy operator names its ``step`` (``jipfed task <step>``) and runs it through
:meth:`SiteOperator.run_step`: in this process, or as a pod when the identity's ``execution``
says so (``jipfed.tasks.execution``); both call the same function of ``jipfed.tasks``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from jipfed.operators.compat import (
    AIRFLOW_V3,
    AirflowException,
    AirflowFailException,
    AirflowSkipException,
    BaseHook,
    BaseOperator,
    Context,
)
from jipfed.operators.pod import connection_env
from jipfed.operators.site.identity import IDENTITY_VARIABLE, load_identity

from jipfed.tasks import env
from jipfed.tasks.connections import EnvConnection
from jipfed.tasks.errors import TaskError, TaskFailed, TaskSkipped
from jipfed.tasks.run import BATCH_NAME, SiteRun, make_run, read_json, write_json

if TYPE_CHECKING:
    from jipfed.federation.dispatch import WorkItem
    from jipfed.tasks.execution import SecretRef

__all__ = ["BATCH_NAME", "SiteOperator", "SiteRun", "make_site_run", "read_json", "task_errors", "write_json"]

WORK_TASK_ID = "get_work"
T = TypeVar("T")


@contextmanager
def task_errors() -> Iterator[None]:
    """Turn the task functions' errors into Airflow's: failed for good, retryable, skipped.

    A heavy library missing here (a scheduler-sized image running a step in-process) fails the
    task with what to do instead of a bare ModuleNotFoundError.
    """
    try:
        yield
    except ModuleNotFoundError as exc:
        raise AirflowFailException(
            f"this Airflow worker cannot run the step in-process: {exc}. Install jip-federated[worker] "
            'here, or run the step as a pod ("execution": {"mode": "pod", ...}, docs/pod-contract.md)'
        ) from exc
    except TaskSkipped as exc:
        raise AirflowSkipException(str(exc)) from exc
    except TaskFailed as exc:
        raise AirflowFailException(str(exc)) from exc
    except TaskError as exc:
        raise AirflowException(str(exc)) from exc


def skip_tasks(operator: BaseOperator, context: Context, task_ids: Sequence[str]) -> None:
    """Skip ``task_ids`` of this run at once, downstream or not (``operator`` mixes in ``SkipMixin``).

    Trigger rules would skip a chain one scheduler loop per task; this sets them all in one go, so
    the task after them starts at the next loop. On Airflow 3 it ends ``operator``'s task (the task
    SDK signals the skip with an exception, after which the return value is not pushed: push it first).
    """
    tasks = [operator.dag.get_task(task_id) for task_id in task_ids]
    if AIRFLOW_V3:
        operator.skip(context["ti"], tasks)  # type: ignore[attr-defined]
    else:
        dag_run = context["dag_run"]
        operator.skip(dag_run, dag_run.execution_date, tasks, map_index=context["ti"].map_index)  # type: ignore[attr-defined]


def work_data_from_xcom(context: Context, work_task_id: str) -> dict[str, Any] | None:
    """The work item's dict the task ``work_task_id`` returned in this run (None if it returned none)."""
    return context["ti"].xcom_pull(task_ids=work_task_id)


def work_from_xcom(context: Context, work_task_id: str) -> WorkItem | None:
    """The work item the task ``work_task_id`` returned in this run (None if it returned none)."""
    from jipfed.federation.dispatch import WorkItem

    data = work_data_from_xcom(context, work_task_id)
    return None if data is None else WorkItem.from_dict(data)


def make_site_run(
    context: Context,
    *,
    site_variable: str,
    hosted_site: str | None,
    work_task_id: str | None,
    operator_in_dir: str | None,
    operator_out_dir: str,
) -> SiteRun:
    """Read the identity (and the work item, if ``work_task_id``) and create the task's out dir."""
    identity = load_identity(site_variable, hosted_site)
    try:
        run_dir = identity.run_dir(context["run_id"])
    except ValueError as exc:
        raise AirflowFailException(str(exc)) from exc
    work_data = work_data_from_xcom(context, work_task_id) if work_task_id else None
    run = make_run(
        identity,
        run_dir,
        operator_in_dir=operator_in_dir,
        operator_out_dir=operator_out_dir,
        work_data=work_data,
    )
    if work_task_id and work_data is None:
        raise AirflowFailException(f"{run.where}: task {work_task_id!r} returned no work item")
    return run


class SiteOperator(BaseOperator):
    """Base of the site DAG's operators (identity, work item, run folders, where a step runs).

    Args:
        site_variable: the Airflow Variable holding the site identity (read at run time).
        hosted_site: the site id this DAG was made for when one Airflow hosts several; the
            identity must name it. None: any.
        work_task_id: the task whose return value is the work item; None for a task that needs none.
        input_operator: upstream operator whose ``operator_out_dir`` is this one's ``operator_in_dir``.
        operator_in_dir: folder name below the run folder to read from (overrides ``input_operator``).
        operator_out_dir: folder name below the run folder to write to; default the task id.
    """

    ui_color = "#d9ecf2"
    #: The ``jipfed task`` step this operator runs (None: a light task, always in-process).
    step: ClassVar[str | None] = None
    #: The connections its step needs (names in ``jipfed.tasks.env.CONNECTIONS``).
    connections: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        site_variable: str = IDENTITY_VARIABLE,
        hosted_site: str | None = None,
        work_task_id: str | None = WORK_TASK_ID,
        input_operator: BaseOperator | None = None,
        operator_in_dir: str | None = None,
        operator_out_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.site_variable = site_variable
        self.hosted_site = hosted_site
        self.work_task_id = work_task_id
        if operator_in_dir is None and input_operator is not None:
            operator_in_dir = getattr(input_operator, "operator_out_dir", None) or input_operator.task_id
        self.operator_in_dir = operator_in_dir
        self.operator_out_dir = operator_out_dir or self.task_id

    def site_run(self, context: Context) -> SiteRun:
        """Identity, work item and folders of this task's run (the out dir is created)."""
        return make_site_run(
            context,
            site_variable=self.site_variable,
            hosted_site=self.hosted_site,
            work_task_id=self.work_task_id,
            operator_in_dir=self.operator_in_dir,
            operator_out_dir=self.operator_out_dir,
        )

    def connection(self, run: SiteRun, name: str) -> EnvConnection:
        """The Airflow Connection the identity names for ``name`` (pacs, central)."""
        conn_id = {"pacs": run.identity.pacs_conn_id, "central": run.identity.central_conn_id}[name]
        return EnvConnection.from_connection(BaseHook.get_connection(conn_id))

    def step_env(self, run: SiteRun) -> dict[str, str]:
        """Variables the step needs beyond the common contract (overridden by train)."""
        return {}

    def pod_env(self, run: SiteRun, run_id: str) -> tuple[dict[str, str], dict[str, SecretRef]]:
        """The pod's plain variables and secret references (``jipfed.tasks.env``), paths as the pod sees them.

        Raises:
            TaskFailed: a path is not on the data volume.
            AirflowFailException: a connection's secret has no Kubernetes Secret (see ``connection_env``).
        """
        identity, execution = run.identity, run.identity.execution
        volume = execution.data_volume
        try:
            pod_identity = {
                **identity.to_dict(),
                "data_root": volume.pod_path(str(identity.data_root), f"{run.where}: data_root"),
                "workflow_dir": volume.pod_path(str(identity.workflow_dir), f"{run.where}: workflow_dir"),
            }
            workflow_dir = volume.pod_path(str(run.run_dir), f"{run.where}: the run folder")
        except ValueError as exc:
            raise TaskFailed(str(exc)) from exc
        plain = env.kaapana_env(
            workflow_dir=workflow_dir,
            run_id=run_id,
            dag_id=self.dag_id,
            task_id=self.task_id,
            in_dir=run.in_dir.name if run.in_dir is not None else None,
            out_dir=run.out_dir.name,
        )
        plain[env.SITE] = json.dumps(pod_identity, sort_keys=True)
        if run.work_data is not None:
            plain[env.WORK] = json.dumps(run.work_data, sort_keys=True)
        plain.update(self.step_env(run))
        secrets: dict[str, SecretRef] = {}
        for name in self.connections:
            conn_env, conn_secrets = connection_env(
                self.connection(run, name), name, execution, where=run.where, step=str(self.step)
            )
            plain.update(conn_env)
            secrets.update(conn_secrets)
        return plain, secrets

    def pod_for(self, run: SiteRun, run_id: str) -> Any:
        """The pod operator that runs this operator's step for ``run`` (what :meth:`run_step` launches)."""
        from jipfed.operators.pod import build_pod_operator

        with task_errors():
            plain, secrets = self.pod_env(run, run_id)
        return build_pod_operator(
            task_id=self.task_id,
            step=str(self.step),
            execution=run.identity.execution,
            plain_env=plain,
            secret_env=secrets,
        )

    def run_step(self, context: Context, in_process: Callable[[SiteRun], T]) -> T:
        """Run this operator's step: ``in_process(run)`` here, or ``jipfed task <step>`` as a pod."""
        from jipfed.operators.pod import launch

        run = self.site_run(context)
        execution = run.identity.execution
        if self.step is None or not execution.runs_in_pod(self.step):
            with task_errors():
                return in_process(run)
        pod = self.pod_for(run, context["run_id"])
        self.log.info("%s: step %r runs as a pod (image %s)", run.where, self.step, execution.image)
        result = launch(pod, context, run.out_dir, run.where)
        # a path the pod returned (its XCom value), as this Airflow sees it
        return execution.data_volume.from_pod(result) if isinstance(result, str) else result

    def input_path(self, run: SiteRun, name: str) -> Any:
        """``<in dir>/<name>``; fails when the operator has no input folder."""
        with task_errors():
            return run.input_path(name)
