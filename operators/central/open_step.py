"""OpenStepOperator: the first task of every central run: start or resume, dispatch the step, push it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jipfed.operators.central._common import open_experiment
from jipfed.operators.central.dispatch import SITE_CONN_ID_TEMPLATE, SITE_DAG_ID, describe_dispatch, push_step
from jipfed.operators.central.start import StartExperimentOperator
from jipfed.operators.compat import Context

#: XCom keys: the start decision (``{"experiment", "status", "step", "n_steps", ...}``), the dispatch record.
DECISION_KEY, DISPATCH_KEY = "decision", "dispatch"


class OpenStepOperator(StartExperimentOperator):
    """Start or resume the experiment, record the step's dispatch and hand it to the sites, in one task.

    1. As :class:`StartExperimentOperator`: decide the run's step (the experiment's next open step)
       and push the XComs ``experiment``, ``step`` and ``decision``.
    2. ``dispatch_step``: record the dispatch with its deadline (now + round timeout); idempotent
       while the deadline has not passed, after it (a cleared run retrying the step) attempt + 1.
    3. Push transport: trigger each selected site's DAG (:func:`push_step`): a site that cannot be
       reached gets its failure recorded and the others go on; each site's outcome is logged.
       Pull transport: the sites find the step when they poll the central endpoint.

    Returns the selected sites (the list the per-site collect tasks are mapped over); an empty list
    when the run has no step (finished, or only finalizing).

    Args:
        site_conn_id_template: Connection id of a site's Airflow API with ``{site}`` (templated).
        site_dag_id: DAG to trigger at a push site (templated; a Connection's ``dag_id`` extra overrides it).
        model_store_conn_id: Connection of the model store (templated).
    """

    template_fields: Sequence[str] = (
        *StartExperimentOperator.template_fields,
        "site_conn_id_template",
        "site_dag_id",
    )

    def __init__(
        self,
        *,
        site_conn_id_template: str = SITE_CONN_ID_TEMPLATE,
        site_dag_id: str = SITE_DAG_ID,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.site_conn_id_template = site_conn_id_template
        self.site_dag_id = site_dag_id

    def execute(self, context: Context) -> list[str]:
        from jipfed.federation.dispatch import dispatch_step

        decision = super().execute(context)
        context["ti"].xcom_push(key=DECISION_KEY, value=decision)
        if decision["step"] is None:
            return []
        exp_store = open_experiment(self.model_store_conn_id, decision["experiment"])
        dispatch = dispatch_step(exp_store, decision["step"])
        self.log.info("%s", describe_dispatch(dispatch))
        context["ti"].xcom_push(key=DISPATCH_KEY, value=dispatch.to_dict())
        push_step(
            exp_store, dispatch, conn_id_template=self.site_conn_id_template, site_dag_id=self.site_dag_id
        )
        return list(dispatch.ticket.sites)
