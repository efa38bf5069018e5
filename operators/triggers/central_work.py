"""CentralWorkTrigger: poll the central for this site's pending work (pull mode, in the triggerer).

It asks ``GET /v1/work?wait_s=25`` (a long poll: the central answers as soon as a step is
dispatched, or empty after 25 s; the blocking HTTP call runs in a thread, ``asyncio.to_thread``)
and asks again at once; a central without the long poll answers at once, and then the trigger
asks every ``poll_interval`` seconds. It fires once, with one of these JSON events:

* ``{"status": "work", "item": <WorkItem.to_dict() of the oldest pending item>}``;
* ``{"status": "idle", "message": ...}`` when ``end_at`` passed without work;
* ``{"status": "error", "message": ...}`` when the central refuses the site (4xx: bad token,
  wrong URL): retrying would not help. Connection errors and 5xx answers are logged and polled
  through.

The central's URL and the site token come from the Connection ``central_conn_id``, resolved in the
triggerer (in a worker thread, like the polls), so the token never sits in the trigger's stored
kwargs. Checked with a Connection stored in the metadata DB: on Airflow 3.3 by
``tests/operators/test_central_work.py::test_the_triggerer_resolves_the_central_connection``
(``airflow standalone``), on Airflow 2.11 with ``airflow scheduler`` + ``airflow triggerer``
(the sensor deferred, the trigger polled with the DB Connection's token and fired on dispatch).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from jipfed.operators.compat import BaseTrigger, TriggerEvent
from jipfed.operators.hooks.central_hook import CentralHook

from jipfed.central.client import CentralClient, CentralError

WORK, IDLE, ERROR = "work", "idle", "error"
#: Longest wait of one work request at the central (its long poll; the central caps it at 25 s).
LONG_POLL_S = 25.0


def _parse_end(end_at: str) -> datetime:
    moment = datetime.fromisoformat(end_at)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def ask_for_work(
    client: CentralClient, left_s: float, poll_interval: float
) -> tuple[list[dict[str, Any]], float]:
    """One long poll for work (at most ``left_s``, :data:`LONG_POLL_S`): the pending items and the
    seconds to pause before the next poll (what is left of ``poll_interval``: nothing after a long
    poll that waited, the whole interval when the central answered at once).

    Raises:
        CentralError: the central refused the poll or cannot be reached (after the client's tries).
    """
    started = time.monotonic()
    items = client.pending_work_dicts(wait_s=max(0.0, min(LONG_POLL_S, left_s)))
    return items, max(0.0, poll_interval - (time.monotonic() - started))


def is_permanent(exc: CentralError) -> bool:
    """A 4xx answer (refused token, unknown path): polling again would get the same answer."""
    return exc.status_code is not None and 400 <= exc.status_code < 500


class CentralWorkTrigger(BaseTrigger):
    """Fires with the oldest work item the central lists for this site, or when ``end_at`` passed.

    Args:
        central_conn_id: the Connection of the central endpoint (URL + this site's token).
        end_at: ISO time (UTC if naive) after which the trigger gives up with an ``idle`` event.
        poll_interval: least seconds between the starts of two polls (matters only where the
            central answers at once: an old central, or one that cannot be reached).
    """

    def __init__(self, central_conn_id: str, end_at: str, poll_interval: float = 30.0) -> None:
        super().__init__()
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval!r}")
        _parse_end(end_at)  # fail on construction, not in the triggerer
        self.central_conn_id = central_conn_id
        self.end_at = end_at
        self.poll_interval = float(poll_interval)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "central_conn_id": self.central_conn_id,
                "end_at": self.end_at,
                "poll_interval": self.poll_interval,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        end = _parse_end(self.end_at)
        try:
            client = await asyncio.to_thread(CentralHook(self.central_conn_id).get_conn)
        except Exception as exc:  # a missing or invalid Connection: no point in polling
            yield TriggerEvent({"status": ERROR, "message": f"Connection {self.central_conn_id!r}: {exc}"})
            return
        polls = 0
        while True:
            polls += 1
            left = (end - datetime.now(timezone.utc)).total_seconds()
            pause = self.poll_interval
            try:
                items, pause = await asyncio.to_thread(ask_for_work, client, left, self.poll_interval)
            except CentralError as exc:
                if is_permanent(exc):
                    yield TriggerEvent({"status": ERROR, "message": str(exc)})
                    return
                self.log.warning("central not reachable (poll %d), polling on: %s", polls, exc)
            else:
                if items:
                    yield TriggerEvent({"status": WORK, "item": items[0]})
                    return
            left = (end - datetime.now(timezone.utc)).total_seconds()
            if left <= 0:
                yield TriggerEvent(
                    {
                        "status": IDLE,
                        "message": f"no work from the central after {polls} poll(s) until {self.end_at}",
                    }
                )
                return
            await asyncio.sleep(min(pause, left))
