"""CentralWorkSensor: the first task of the pull-mode site DAG; waits until the central has work.

Deferrable by default: the wait runs in the triggerer (:class:`CentralWorkTrigger`), holding no
worker slot, after ``worker_wait_s`` seconds (default 0) of waiting in the worker itself. Both
long-poll the central (``GET /v1/work?wait_s=``), so a dispatched step is seen at once; work found
in the worker phase starts without the triggerer's and the scheduler's round trip (about a second
each), which is why the pull DAG waits there first: its next run starts right after a step ended,
when the next step is seconds away. With ``deferrable=False`` it pokes every ``poke_interval`` seconds.
After ``timeout`` seconds without work it ends the run: skipped with ``soft_fail=True`` (the
default, so an idle ``@continuous`` run ends cleanly and the next one starts), failed otherwise.
A refusal by the central (bad token, wrong URL) fails the task even with ``soft_fail``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from jipfed.operators.compat import (
    AIRFLOW_V3,
    AirflowFailException,
    AirflowSkipException,
    BaseSensorOperator,
    Context,
    PokeReturnValue,
)
from jipfed.operators.hooks.central_hook import CentralHook
from jipfed.operators.site.base import make_site_run
from jipfed.operators.site.identity import IDENTITY_VARIABLE, SiteIdentity, load_identity
from jipfed.operators.site.work import take_work
from jipfed.operators.triggers.central_work import (
    ERROR,
    IDLE,
    WORK,
    CentralWorkTrigger,
    ask_for_work,
    is_permanent,
)

from jipfed.central.client import CentralError

if AIRFLOW_V3:
    from airflow.sdk.bases.branch import BranchMixIn
    from airflow.sdk.exceptions import DownstreamTasksSkipped
else:  # Airflow 2 skips the downstream tasks in the database, without an exception
    from airflow.operators.branch import BranchMixIn

    DownstreamTasksSkipped = None

#: Extra seconds the deferral may last beyond ``timeout`` (the trigger ends itself at ``timeout``).
DEFERRAL_MARGIN_S = 120


class CentralWorkError(RuntimeError):
    """The central refused this site's poll. Not an AirflowException, so ``soft_fail`` does not skip it."""


class CentralWorkSensor(BaseSensorOperator, BranchMixIn):
    """Wait for a step the central dispatched to this site; return its work item.

    Args:
        site_variable: the Airflow Variable holding the site identity (read at run time).
        hosted_site: the site id this DAG was made for when one Airflow hosts several.
        operator_out_dir: folder below the run folder for ``work.json``; default the task id.
        deferrable: wait in the triggerer (True) or poke from the worker (False).
        worker_wait_s: deferrable only: seconds to long-poll from the worker before deferring
            (bounded by ``timeout``); 0 defers at once.
        poke_interval, timeout, soft_fail: as for every sensor (seconds); ``poke_interval`` is
            also the trigger's poll interval.
        prepare: (cohort task id, model task id): on a cached round do their work here and skip
            them (``take_work``); empty: never.

    Returns (XCom): the oldest pending work item's dict, also written to ``work.json``.
    """

    ui_color = "#d9ecf2"
    inherits_from_skipmixin = True  # Airflow 3: the scheduler lets this task skip its downstream

    def __init__(
        self,
        *,
        site_variable: str = IDENTITY_VARIABLE,
        hosted_site: str | None = None,
        operator_out_dir: str | None = None,
        prepare: Sequence[str] = (),
        deferrable: bool = True,
        worker_wait_s: float = 0.0,
        poke_interval: float = 30.0,
        timeout: float = 3600.0,
        soft_fail: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(poke_interval=poke_interval, timeout=timeout, soft_fail=soft_fail, **kwargs)
        self.site_variable = site_variable
        self.hosted_site = hosted_site
        self.operator_out_dir = operator_out_dir or self.task_id
        if not worker_wait_s >= 0:
            raise ValueError(f"worker_wait_s must be >= 0, got {worker_wait_s!r}")
        self.deferrable = deferrable
        self.worker_wait_s = float(worker_wait_s)
        self.prepare = tuple(prepare)

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        identity = load_identity(self.site_variable, self.hosted_site)
        end_at = datetime.now(timezone.utc) + timedelta(seconds=float(self.timeout))
        if self.worker_wait_s > 0:
            item = self._wait_in_worker(identity, min(self.worker_wait_s, float(self.timeout)))
            if item is not None:
                return self._accept(context, item)
        self.log.info(
            "site %s: waiting for work from the central (Connection %r) until %s",
            identity.site_id,
            identity.central_conn_id,
            end_at.isoformat(timespec="seconds"),
        )
        self.defer(
            trigger=CentralWorkTrigger(
                central_conn_id=identity.central_conn_id,
                end_at=end_at.isoformat(),
                poll_interval=float(self.poke_interval),
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=float(self.timeout) + DEFERRAL_MARGIN_S),
        )

    def _poll(self, identity: SiteIdentity, left_s: float) -> tuple[list[dict[str, Any]], float]:
        """:func:`ask_for_work` (long poll up to ``left_s``); a central that cannot be reached is
        logged and gives no items and a pause of ``poke_interval``; a refusal fails the task."""
        client = CentralHook(identity.central_conn_id).get_conn()
        try:
            return ask_for_work(client, left_s, float(self.poke_interval))
        except CentralError as exc:
            if is_permanent(exc):
                raise CentralWorkError(
                    f"site {identity.site_id!r}: the central refused the poll: {exc}"
                ) from exc
            self.log.warning("site %s: central not reachable, polling on: %s", identity.site_id, exc)
            return [], float(self.poke_interval)

    def _wait_in_worker(self, identity: SiteIdentity, seconds: float) -> dict[str, Any] | None:
        """Long-poll the central from the worker for up to ``seconds``; the oldest item, or None."""
        self.log.info("site %s: waiting for work in the worker for up to %.0f s", identity.site_id, seconds)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            items, pause = self._poll(identity, left)
            if items:
                return items[0]
            time.sleep(max(0.0, min(pause, end - time.monotonic())))
        return None

    def poke(self, context: Context) -> bool | PokeReturnValue:
        identity = load_identity(self.site_variable, self.hosted_site)
        items, _ = self._poll(identity, 0.0)
        if not items:
            return False
        self.log.info("site %s: %d pending work item(s); taking the oldest", identity.site_id, len(items))
        return PokeReturnValue(is_done=True, xcom_value=self._accept(context, items[0]))

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger fired: accept its work item, or end the run."""
        status = (event or {}).get("status")
        if status == WORK:
            return self._accept(context, event["item"])  # type: ignore[index]
        message = (event or {}).get("message", f"unexpected trigger event {event!r}")
        if status == IDLE:
            if self.soft_fail:
                raise AirflowSkipException(f"{message}; ending this run")
            raise AirflowFailException(message)
        if status == ERROR:
            raise CentralWorkError(f"polling the central failed: {message}")
        raise CentralWorkError(message)

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context: Context) -> Any:
        """As every sensor's, except that skipping the tasks this one did (a cached round, Airflow 3
        signals it with an exception) stays that, not a skip of this task by ``soft_fail``."""
        try:
            return super().resume_execution(next_method, next_kwargs, context)
        except AirflowSkipException as exc:
            if DownstreamTasksSkipped is not None and isinstance(exc.__cause__, DownstreamTasksSkipped):
                raise exc.__cause__ from None
            raise

    def _accept(self, context: Context, data: dict[str, Any]) -> dict[str, Any]:
        run = make_site_run(
            context,
            site_variable=self.site_variable,
            hosted_site=self.hosted_site,
            work_task_id=None,
            operator_in_dir=None,
            operator_out_dir=self.operator_out_dir,
        )
        from jipfed.federation.dispatch import WorkItem

        item = WorkItem.from_dict(data)
        self.log.info(
            "site %s: work for experiment %s round %d step %d, deadline %s",
            run.identity.site_id,
            item.ticket.experiment,
            item.ticket.round,
            item.ticket.step,
            item.dispatch.deadline.isoformat(),
        )
        return take_work(self, context, run, item, self.prepare)
