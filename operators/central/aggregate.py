"""AggregateStepOperator: close the run's step with the quorum rule (in-process or as a pod)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jipfed.operators.central._common import DEFAULT_STORE_CONN_ID, open_experiment, step_number
from jipfed.operators.compat import (
    AirflowFailException,
    AirflowSkipException,
    BaseHook,
    BaseOperator,
    Context,
    TriggerRule,
    Variable,
)
from jipfed.operators.pod import connection_env
from jipfed.operators.site.base import task_errors

from jipfed.tasks import env
from jipfed.tasks.aggregate import aggregate, step_record, where
from jipfed.tasks.connections import EnvConnection
from jipfed.tasks.execution import CentralSettings, SecretRef

__all__ = ["CENTRAL_VARIABLE", "AggregateStepOperator", "central_settings", "step_record"]

#: The Airflow Variable with the central's deployment settings (execution mode, pods).
CENTRAL_VARIABLE = "jipfed_central"


def central_settings(variable: str = CENTRAL_VARIABLE) -> CentralSettings:
    """The central's settings from ``variable`` (absent: everything in-process); fails the task when invalid."""
    raw = Variable.get(variable, None)  # positional: 2.x and 3.x names differ
    if raw is None or not str(raw).strip():
        return CentralSettings()
    try:
        return CentralSettings.from_dict(json.loads(raw) if isinstance(raw, str) else raw)
    except (TypeError, ValueError) as exc:
        raise AirflowFailException(
            f"Airflow Variable {variable!r} does not hold valid central settings: {exc}"
        ) from exc


class AggregateStepOperator(BaseOperator):
    """``aggregate_step`` of the run's step once every collect task is done (trigger rule all_done).

    Logs the sites included, rejected and missing with their reasons, and returns the step's
    stored record. Too few valid updates (``QuorumNotMet``) fails the task without retries: the
    global model and the experiment state stay untouched, and clearing the run retries the step
    (after the deadline it is dispatched again as a new attempt). With no step left (the run only
    finalizes) the task is skipped. Runs as the pod ``jipfed task aggregate`` when the Variable
    ``jipfed_central`` says so (``execution``, see ``jipfed.tasks.execution``).

    Args:
        experiment: Experiment name (templated).
        step: The step to aggregate (templated; None = no step in this run: skipped).
        model_store_conn_id: Connection of the model store (templated).
        dispatch_next: open the next step for pulling sites right after aggregating.
        settings_variable: the Variable with the central's settings.
    """

    template_fields: Sequence[str] = ("experiment", "step", "model_store_conn_id")

    def __init__(
        self,
        *,
        experiment: str,
        step: Any,
        model_store_conn_id: str = DEFAULT_STORE_CONN_ID,
        dispatch_next: bool = True,
        settings_variable: str = CENTRAL_VARIABLE,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("trigger_rule", TriggerRule.ALL_DONE)
        super().__init__(**kwargs)
        self.experiment = experiment
        self.step = step
        self.model_store_conn_id = model_store_conn_id
        self.dispatch_next = dispatch_next
        self.settings_variable = settings_variable

    def execute(self, context: Context) -> dict[str, Any]:
        if self.step is None:
            raise AirflowSkipException("no step to aggregate in this run")
        return self.aggregate_step(context, step_number(self.step, self.experiment))

    def aggregate_step(self, context: Context, step: int) -> dict[str, Any]:
        """Aggregate ``step`` in this process or as the pod; returns the step's stored record."""
        settings = central_settings(self.settings_variable)
        if settings.execution.runs_in_pod("aggregate"):
            from jipfed.operators.pod import launch

            out_dir = Path(str(settings.workflow_dir)) / context["run_id"] / self.task_id
            out_dir.mkdir(parents=True, exist_ok=True)
            return launch(
                self.pod_for(settings, context["run_id"], step),
                context,
                out_dir,
                where(self.experiment, step),
            )
        with task_errors():
            return aggregate(
                open_experiment(self.model_store_conn_id, self.experiment), step, open_next=self.dispatch_next
            )

    def pod_env(
        self, settings: CentralSettings, run_id: str, step: int
    ) -> tuple[dict[str, str], dict[str, SecretRef]]:
        """The pod's variables (paths as the pod sees them) and the store's secret reference."""
        execution = settings.execution
        here = where(self.experiment, step)
        try:
            workflow_dir = execution.data_volume.pod_path(
                str(Path(str(settings.workflow_dir)) / run_id), f"{here}: the run folder"
            )
        except ValueError as exc:
            raise AirflowFailException(str(exc)) from exc
        plain = env.kaapana_env(
            workflow_dir=workflow_dir,
            run_id=run_id,
            dag_id=self.dag_id,
            task_id=self.task_id,
            in_dir=None,
            out_dir=self.task_id,
        )
        conn = EnvConnection.from_connection(BaseHook.get_connection(self.model_store_conn_id))
        conn_env, secrets = connection_env(conn, "store", execution, where=here, step="aggregate")
        plain.update(
            {
                env.EXPERIMENT: self.experiment,
                env.STEP: str(step),
                env.DISPATCH_NEXT: "1" if self.dispatch_next else "0",
                **conn_env,
            }
        )
        return plain, secrets

    def pod_for(self, settings: CentralSettings, run_id: str, step: int) -> Any:
        """The pod operator that runs ``jipfed task aggregate`` for ``step`` (what execute() launches)."""
        from jipfed.operators.pod import build_pod_operator

        plain, secrets = self.pod_env(settings, run_id, step)
        return build_pod_operator(
            task_id=self.task_id,
            step="aggregate",
            execution=settings.execution,
            plain_env=plain,
            secret_env=secrets,
        )
