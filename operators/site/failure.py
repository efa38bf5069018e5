"""``report_failure_to_central``: the site tasks' ``on_failure_callback``.

When a task fails for good (retries used up), the site tells the central at once that it sends
no update for the step, and why ("<task_id> failed: <message tail>"), so the central's collect
stops waiting for this site instead of running into the step's deadline. A callback must never
raise: every problem (no work item yet, central unreachable, step already closed) is logged.
"""

from __future__ import annotations

import logging
from typing import Any

from jipfed.operators.hooks.central_hook import CentralHook
from jipfed.operators.site.base import work_from_xcom
from jipfed.operators.site.identity import IDENTITY_VARIABLE, load_identity

logger = logging.getLogger(__name__)

#: Characters of the exception message sent (the end of it: where the cause usually is).
REASON_TAIL_CHARS = 1000


def failure_reason(task_id: str, exception: BaseException | str | None) -> str:
    """``"<task_id> failed: <the last REASON_TAIL_CHARS characters of the message>"``."""
    text = str(exception).strip() if exception is not None else ""
    if isinstance(exception, BaseException) and not text:
        text = type(exception).__name__
    if len(text) > REASON_TAIL_CHARS:
        text = "..." + text[-REASON_TAIL_CHARS:]
    return f"{task_id} failed: {text or 'no error message'}"


def report_failure_to_central(context: Any) -> None:
    """Report the failed task's step to the central as this site's failure (logs, never raises).

    Reads from the failed task (a ``SiteOperator``): ``site_variable``, ``hosted_site`` and
    ``work_task_id``, i.e. the identity (for the central Connection) and the work item.
    """
    task = context.get("task")
    task_id = getattr(task, "task_id", "?")
    try:
        work_task_id = getattr(task, "work_task_id", None)
        work = work_from_xcom(context, work_task_id) if work_task_id else None
        if work is None:
            logger.warning("task %s failed before this run had a work item: nothing to report", task_id)
            return
        ticket = work.ticket
        identity = load_identity(
            getattr(task, "site_variable", IDENTITY_VARIABLE), getattr(task, "hosted_site", None)
        )
        reason = failure_reason(task_id, context.get("exception"))
        CentralHook(identity.central_conn_id).get_conn().report_failure(
            ticket.experiment, ticket.round, ticket.step, reason
        )
        logger.warning(
            "site %s reported to the central: experiment %s round %d step %d: %s",
            identity.site_id,
            ticket.experiment,
            ticket.round,
            ticket.step,
            reason,
        )
    except Exception:  # a callback must not raise; the task has failed already
        logger.exception("task %s failed and the failure could not be reported to the central", task_id)
