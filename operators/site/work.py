"""GetWorkOperator: the step a push-triggered run answers, as the central lists it for this site."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from jipfed.operators.compat import AIRFLOW_V3, AirflowFailException, BaseOperator, Context
from jipfed.operators.hooks.central_hook import CentralHook
from jipfed.operators.site.base import SiteOperator, SiteRun, skip_tasks, write_json
from jipfed.operators.site.data import prepare_cached_round

if AIRFLOW_V3:
    from airflow.sdk.bases.branch import BranchMixIn
else:
    from airflow.operators.branch import BranchMixIn

if TYPE_CHECKING:
    from jipfed.federation.dispatch import WorkItem

WORK_FILE = "work.json"


def describe(items: Sequence[WorkItem]) -> str:
    """``exp1 round 0 step 0, ...`` (or ``none``) for messages."""
    names = [f"{i.ticket.experiment} round {i.ticket.round} step {i.ticket.step}" for i in items]
    return ", ".join(names) or "none"


def accept_work(run: SiteRun, item: WorkItem) -> dict[str, Any]:
    """Check that ``item`` selects this site, write it to ``<out dir>/work.json``, return its dict.

    The central decides which site a token acts as; an item that does not select the identity's
    site means the Connection's token belongs to another site.
    """
    site = run.identity.site_id
    if site not in item.ticket.sites:
        raise AirflowFailException(
            f"site {site!r}: the central sent work for sites {list(item.ticket.sites)} "
            f"(experiment {item.ticket.experiment!r}, step {item.ticket.step}); the token in Connection "
            f"{run.identity.central_conn_id!r} belongs to another site"
        )
    data = item.to_dict()
    write_json(run.out_dir / WORK_FILE, data)
    return data


def take_work(
    operator: BaseOperator, context: Context, run: SiteRun, item: WorkItem, prepare: Sequence[str]
) -> dict[str, Any]:
    """:func:`accept_work`, then, with ``prepare`` = (cohort task, model task), do their work here
    when it only hits caches (:func:`prepare_cached_round`) and skip them and the cohort's cached
    stages at once. ``operator`` must mix in ``BranchMixIn``. Returns the work item's dict.
    """
    data = accept_work(run, item)
    if prepare:
        cohort, model = prepare
        with_work = dataclasses.replace(run, work_data=data)
        if prepare_cached_round(
            operator.dag, with_work, cohort_task_id=cohort, model_task_id=model, log=operator.log
        ):
            context["ti"].xcom_push(key="return_value", value=data)  # Airflow 3 ends the task when it skips
            skip_tasks(operator, context, [cohort, *operator.dag.get_task(cohort).cached_stages, model])
    return data


def find_work(items: Sequence[WorkItem], experiment: str, round: int, step: int, *, site: str) -> WorkItem:
    """The item for (experiment, round, step) among the central's pending ``items`` for ``site``.

    Raises:
        AirflowFailException: the central lists no such step for the site.
    """
    for item in items:
        if (item.ticket.experiment, item.ticket.round, item.ticket.step) == (experiment, round, step):
            return item
    raise AirflowFailException(
        f"central has no open step {step} (round {round}) of experiment {experiment!r} for site {site!r}: "
        f"it was never dispatched, it closed, its deadline passed, or this site answered it already. "
        f"Pending for this site: {describe(items)}"
    )


class GetWorkOperator(SiteOperator, BranchMixIn):
    """Push mode: find the step the run's conf names among the central's pending work for this site.

    The conf only says *which* step (experiment, round, step); everything else (ticket, deadline,
    experiment config, dataset) comes from the central.

    Args:
        experiment, round, step: the step to answer (templated; default the run's params).
        prepare: (cohort task id, model task id): on a cached round do their work here and skip
            them (:func:`take_work`); empty: never.
        **kwargs: see :class:`SiteOperator` (``work_task_id`` is None: this task makes the work item).

    Returns (XCom): the work item's dict (``WorkItem.to_dict()``), also written to ``work.json``.
    """

    template_fields = ("experiment", "round", "step")
    inherits_from_skipmixin = True  # Airflow 3: the scheduler lets this task skip its downstream

    def __init__(
        self,
        *,
        experiment: str = "{{ params.experiment }}",
        round: str | int = "{{ params.round }}",
        step: str | int = "{{ params.step }}",
        prepare: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("work_task_id", None)
        super().__init__(**kwargs)
        if prepare and len(prepare) != 2:
            raise ValueError(f"prepare must name the cohort and the model task, got {prepare!r}")
        self.experiment = experiment
        self.round = round
        self.step = step
        self.prepare = tuple(prepare)

    def execute(self, context: Context) -> dict[str, Any]:
        run = self.site_run(context)
        try:
            wanted = (str(self.experiment), int(self.round), int(self.step))
        except (TypeError, ValueError):
            raise AirflowFailException(
                f"site {run.identity.site_id!r}: the run names experiment {self.experiment!r}, "
                f"round {self.round!r}, step {self.step!r}; round and step must be integers"
            ) from None
        items = CentralHook(run.identity.central_conn_id).get_conn().pending_work()
        item = find_work(items, *wanted, site=run.identity.site_id)
        self.log.info(
            "site %s: work for experiment %s round %d step %d, deadline %s",
            run.identity.site_id,
            item.ticket.experiment,
            item.ticket.round,
            item.ticket.step,
            item.dispatch.deadline.isoformat(),
        )
        return take_work(self, context, run, item, self.prepare)
