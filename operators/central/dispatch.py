"""DispatchStepOperator (record the step's dispatch) and DispatchToSiteOperator (reach one site)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jipfed.operators.central._common import (
    DEFAULT_STORE_CONN_ID,
    open_experiment,
    step_dispatch,
    step_number,
    where,
)
from jipfed.operators.compat import (
    AirflowException,
    AirflowNotFoundException,
    AirflowSkipException,
    BaseOperator,
    Context,
)
from jipfed.operators.hooks import AirflowApiHook

from jipfed.airflow_rest import AirflowRestError

#: XCom key of the full dispatch record (the return value is the list of selected sites, for mapping).
DISPATCH_KEY = "dispatch"
#: Connection id of a site's Airflow REST API, ``{site}`` replaced by the site id.
SITE_CONN_ID_TEMPLATE = "jipfed_site_{site}"
#: The DAG the central triggers at a site (a Connection's ``dag_id`` extra overrides it).
SITE_DAG_ID = "jipfed_site"


def site_run_id(experiment: str, step: int, attempt: int) -> str:
    """Run id of the site DAG run for one dispatch attempt (the same on retries: triggering is idempotent)."""
    return f"jipfed__{experiment}__s{step}__a{attempt}"


class DispatchStepOperator(BaseOperator):
    """Record the dispatch of the run's step (``dispatch_step``: ticket, transport, deadline).

    Idempotent while the deadline has not passed; after it passed (a cleared run retrying the
    step) the step is dispatched again as attempt + 1. Returns the selected sites (the list the
    per-site tasks are mapped over) and pushes the dispatch record as XCom key ``"dispatch"``.

    Args:
        experiment: Experiment name (templated).
        step: The step to dispatch (templated; usually the start task's XCom ``step``).
        model_store_conn_id: Connection of the model store (templated).
    """

    template_fields: Sequence[str] = ("experiment", "step", "model_store_conn_id")

    def __init__(
        self,
        *,
        experiment: str,
        step: Any,
        model_store_conn_id: str = DEFAULT_STORE_CONN_ID,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.experiment = experiment
        self.step = step
        self.model_store_conn_id = model_store_conn_id

    def execute(self, context: Context) -> list[str]:
        from jipfed.federation.dispatch import dispatch_step

        step = step_number(self.step, self.experiment)
        exp_store = open_experiment(self.model_store_conn_id, self.experiment)
        dispatch = dispatch_step(exp_store, step)
        ticket = dispatch.ticket
        self.log.info(
            "%s: dispatched (attempt %d) to %s by %s; deadline %s (%.0f s left)",
            where(self.experiment, step, ticket.round),
            dispatch.attempt,
            list(ticket.sites),
            dispatch.transport,
            dispatch.deadline.isoformat(),
            dispatch.seconds_left(),
        )
        context["ti"].xcom_push(key=DISPATCH_KEY, value=dispatch.to_dict())
        return list(ticket.sites)


class DispatchToSiteOperator(BaseOperator):
    """Hand the dispatched step to one site (mapped over the selected sites).

    Push transport: trigger the site's DAG through its Airflow REST API (Connection
    ``site_conn_id_template.format(site=site)``, DAG ``site_dag_id`` unless the Connection's
    ``dag_id`` extra names another) with conf ``{"experiment", "round", "step"}`` and run id
    ``jipfed__<experiment>__s<step>__a<attempt>`` (an existing run is fine). If the site cannot be
    reached, its failure is recorded (``report_site_failure``, source ``central``) and the task is
    skipped: the step goes on and the quorum decides. Pull transport: nothing to send, the site
    finds the step when it polls the central endpoint.

    Args:
        experiment: Experiment name (templated).
        step: The dispatched step (templated).
        site: The site id (templated; mapped).
        site_conn_id_template: Connection id of a site's Airflow API with ``{site}`` (templated).
        site_dag_id: DAG to trigger at the site (templated).
        model_store_conn_id: Connection of the model store (templated).
    """

    template_fields: Sequence[str] = (
        "experiment",
        "step",
        "site",
        "site_conn_id_template",
        "site_dag_id",
        "model_store_conn_id",
    )

    def __init__(
        self,
        *,
        experiment: str,
        step: Any,
        site: str,
        site_conn_id_template: str = SITE_CONN_ID_TEMPLATE,
        site_dag_id: str = SITE_DAG_ID,
        model_store_conn_id: str = DEFAULT_STORE_CONN_ID,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.experiment = experiment
        self.step = step
        self.site = site
        self.site_conn_id_template = site_conn_id_template
        self.site_dag_id = site_dag_id
        self.model_store_conn_id = model_store_conn_id

    def execute(self, context: Context) -> dict[str, Any] | None:
        from jipfed.federation.dispatch import report_site_failure

        step = step_number(self.step, self.experiment)
        exp_store = open_experiment(self.model_store_conn_id, self.experiment)
        dispatch = step_dispatch(exp_store, step)
        here = where(self.experiment, step, dispatch.ticket.round, self.site)
        if self.site not in dispatch.ticket.sites:
            raise ValueError(
                f"{here}: the site is not selected for this step ({list(dispatch.ticket.sites)})"
            )
        if dispatch.transport == "pull":
            self.log.info("%s: pull transport, the site will pull the step from the central endpoint", here)
            return None
        conn_id = self.site_conn_id_template.format(site=self.site)
        run_id = site_run_id(self.experiment, step, dispatch.attempt)
        conf = {"experiment": self.experiment, "round": dispatch.ticket.round, "step": step}
        try:
            hook = AirflowApiHook(conn_id)
            dag_id = hook.dag_id(self.site_dag_id)
            run = hook.trigger_dag_run(dag_id, conf=conf, run_id=run_id, exist_ok=True)
        except (AirflowRestError, AirflowNotFoundException, ValueError) as exc:
            transient = isinstance(exc, AirflowRestError) and (
                exc.status_code is None or exc.status_code >= 500
            )
            if transient and context["ti"].try_number <= (self.retries or 0):
                raise AirflowException(f"{here}: push failed, retrying: {exc}") from exc  # e.g. a busy DB
            reason = f"central could not push the step to the site (connection {conn_id!r}): {exc}"
            stored = report_site_failure(
                exp_store, self.site, dispatch.ticket.round, step, reason, source="central"
            )
            self.log.warning("%s: %s", here, stored["reason"])
            raise AirflowSkipException(f"{here}: {stored['reason']}") from None
        self.log.info(
            "%s: triggered DAG %s run %s on the site (state %s)", here, dag_id, run_id, run.get("state")
        )
        return {"dag_id": dag_id, "run_id": run_id, "conn_id": conn_id}
