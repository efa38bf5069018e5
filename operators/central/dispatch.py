"""Hand a dispatched step to the sites: trigger each push site's DAG, one site never stopping the others."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from jipfed.operators.central._common import where
from jipfed.operators.compat import AirflowNotFoundException
from jipfed.operators.hooks import AirflowApiHook

from jipfed.airflow_rest import AirflowRestError

if TYPE_CHECKING:  # the federation modules import torch: only at run time
    from jipfed.federation.dispatch import Dispatch
    from jipfed.storage.state import ExperimentStore

logger = logging.getLogger(__name__)

#: Connection id of a site's Airflow REST API, ``{site}`` replaced by the site id.
SITE_CONN_ID_TEMPLATE = "jipfed_site_{site}"
#: The DAG the central triggers at a site (a Connection's ``dag_id`` extra overrides it).
SITE_DAG_ID = "jipfed_site"
#: Passes over the sites whose push failed transiently (5xx, no answer) before the failure is recorded.
PUSH_PASSES = 3
#: Seconds between two passes.
PUSH_RETRY_DELAY_S = 2.0


def site_run_id(experiment: str, step: int, attempt: int) -> str:
    """Run id of the site DAG run for one dispatch attempt (the same on retries: triggering is idempotent)."""
    return f"jipfed__{experiment}__s{step}__a{attempt}"


class PushFailed(Exception):
    """The site's Airflow did not take the step; ``transient`` when trying again may help."""

    def __init__(self, reason: str, *, transient: bool) -> None:
        super().__init__(reason)
        self.transient = transient


def push_to_site(
    dispatch: Dispatch,
    site: str,
    *,
    conn_id_template: str = SITE_CONN_ID_TEMPLATE,
    site_dag_id: str = SITE_DAG_ID,
) -> str:
    """Trigger the site's DAG for the dispatched step (an existing run of the same id is fine).

    Uses the Connection ``conn_id_template.format(site=site)`` (its ``dag_id`` extra overrides
    ``site_dag_id``), conf ``{"experiment", "round", "step"}`` and run id :func:`site_run_id`.
    Returns what happened, for the log. Raises :class:`PushFailed`.
    """
    ticket = dispatch.ticket
    conn_id = conn_id_template.format(site=site)
    run_id = site_run_id(ticket.experiment, ticket.step, dispatch.attempt)
    conf = {"experiment": ticket.experiment, "round": ticket.round, "step": ticket.step}
    try:
        hook = AirflowApiHook(conn_id)
        dag_id = hook.dag_id(site_dag_id)
        run = hook.trigger_dag_run(dag_id, conf=conf, run_id=run_id, exist_ok=True)
    except (AirflowRestError, AirflowNotFoundException, ValueError) as exc:
        transient = isinstance(exc, AirflowRestError) and (exc.status_code is None or exc.status_code >= 500)
        raise PushFailed(
            f"central could not push the step to the site (connection {conn_id!r}): {exc}",
            transient=transient,
        ) from exc
    return f"triggered DAG {dag_id} run {run_id} on the site (state {run.get('state')})"


def push_step(
    exp_store: ExperimentStore,
    dispatch: Dispatch,
    *,
    conn_id_template: str = SITE_CONN_ID_TEMPLATE,
    site_dag_id: str = SITE_DAG_ID,
    passes: int = PUSH_PASSES,
    retry_delay_s: float = PUSH_RETRY_DELAY_S,
) -> dict[str, str]:
    """Push the dispatched step to every selected site; returns ``{site: outcome}`` (all logged).

    A site that cannot be reached (after ``passes`` tries when the error is transient) gets its
    failure recorded (``report_site_failure``, source ``central``): its collect task skips and the
    quorum decides. No site's failure stops the push to the others. Pull transport: nothing to send.
    """
    from jipfed.federation.dispatch import report_site_failure

    ticket = dispatch.ticket
    if dispatch.transport != "push":
        return {
            site: "pull transport: the site pulls the step from the central endpoint" for site in ticket.sites
        }
    outcomes: dict[str, str] = {}
    pending = list(ticket.sites)
    for attempt in range(1, passes + 1):
        retry = []
        for site in pending:
            here = where(ticket.experiment, ticket.step, ticket.round, site)
            try:
                outcomes[site] = push_to_site(
                    dispatch, site, conn_id_template=conn_id_template, site_dag_id=site_dag_id
                )
            except PushFailed as exc:
                if exc.transient and attempt < passes:
                    logger.warning(
                        "%s: push failed (try %d of %d), trying again: %s", here, attempt, passes, exc
                    )
                    retry.append(site)
                    continue
                stored = report_site_failure(
                    exp_store, site, ticket.round, ticket.step, str(exc), source="central"
                )
                outcomes[site] = f"not reached, failure recorded: {stored['reason']}"
                logger.warning("%s: %s", here, outcomes[site])
            else:
                logger.info("%s: %s", here, outcomes[site])
        if not retry:
            break
        time.sleep(retry_delay_s)
        pending = retry
    return outcomes


def describe_dispatch(dispatch: Dispatch) -> str:
    """``experiment 'x', round 0, step 0: attempt 0 to [...] by push; deadline ... (600 s left)``."""
    ticket = dispatch.ticket
    return (
        f"{where(ticket.experiment, ticket.step, ticket.round)}: dispatched (attempt {dispatch.attempt}) to "
        f"{list(ticket.sites)} by {dispatch.transport}; deadline {dispatch.deadline.isoformat()} "
        f"({dispatch.seconds_left():.0f} s left)"
    )


__all__ = [
    "PUSH_PASSES",
    "SITE_CONN_ID_TEMPLATE",
    "SITE_DAG_ID",
    "PushFailed",
    "describe_dispatch",
    "push_step",
    "push_to_site",
    "site_run_id",
]
