"""JIP Federated model lines (Apache Airflow 2.11 and 3.x): scheduled retraining, released only when not worse.

### What a run does
Every run (hourly by default; Variable-free: set `JIPFED_LINES_SCHEDULE` to change the check
interval) looks at the model lines in the model store (Connection `jipfed_model_store_default`)
and, for each line whose own cron schedule is due (its latest scheduled time not yet run; missed
nights run once) or whose run is unfinished:

1. **census**: every site says how many new cases it has since the line's watermark (counts
   only); nothing new anywhere ends the line's run as *skipped* with the reason;
2. **training**: a short federated experiment `<line>-<slot>` with the round protocol
   (the central DAG's core: dispatch, collect, quorum, aggregate, finalize), warm-started from
   the released model, on each site's new cases plus a replay sample of older ones;
3. **evaluation**: every site scores the candidate and the released model on its held-out cases;
4. **release rule**: the candidate becomes the released version, or is kept as rejected with
   the reasons. History, model cards and the released pointer live under `lines/<line>/`.

`run_line` waits for the sites in reschedule mode (no worker slot held between checks); all state
is in the store, so a cleared or crashed run resumes and never releases twice.

### Creating or changing a line
Trigger this DAG with the form's **line** field: a JSON object following the line schema
(`jipfed.lines.definition.LINE_SCHEMA`; e.g. `{"name": "glioma", "sites": ["site-a", "site-b"],
"schedule": "0 2 * * *", "replay": 4}`); an existing line is changed key by key. Or use
`jipfed lines create|set` on the command line.
"""

from __future__ import annotations

import datetime as dt
import os

from jipfed.operators.compat import Param, PokeReturnValue, dag, get_current_context, task

from jipfed.lines.definition import LINE_SCHEMA

DAG_ID = "jipfed_nightly"
STORE_CONN_ID = "jipfed_model_store_default"
#: How often the DAG checks the lines' own schedules (cron or preset).
SCHEDULE = os.environ.get("JIPFED_LINES_SCHEDULE", "@hourly")
#: Seconds between checks of a running line (sites answering, steps closing).
POKE_INTERVAL_S = float(os.environ.get("JIPFED_LINES_POKE_S", "30"))
LINE_FORM = {k: v for k, v in LINE_SCHEMA.items() if k not in ("$schema", "title", "required")}


def _store():
    from jipfed.operators.hooks.model_store_hook import ModelStoreHook

    return ModelStoreHook(STORE_CONN_ID).get_conn()


@dag(
    dag_id=DAG_ID,
    schedule=SCHEDULE,
    start_date=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    params={
        "line": Param(
            None,
            type=["null", "object"],
            description="Create or change a model line (JSON, see the DAG docs); empty: only run due lines.",
            **{k: v for k, v in LINE_FORM.items() if k != "type"},
        )
    },
    default_args={"retries": 2, "retry_delay": dt.timedelta(seconds=10)},
    doc_md=__doc__,
    tags=["jipfed", "federated-learning", "lines"],
)
def jipfed_nightly() -> None:
    @task
    def define_line() -> str | None:
        from jipfed.lines.nightly import define_line as define

        return define(_store(), get_current_context()["params"].get("line"))

    @task
    def due_lines() -> list[dict[str, str]]:
        from jipfed.lines.nightly import due_runs

        context = get_current_context()
        now = context.get("data_interval_end") or context["logical_date"]
        return due_runs(_store(), now)

    @task.sensor(poke_interval=POKE_INTERVAL_S, timeout=7 * 24 * 3600, mode="reschedule")
    def run_line(run: dict[str, str]) -> PokeReturnValue:
        from jipfed.lines.nightly import RUNNING, advance

        record = advance(_store(), run["line"], run["slot"])
        summary = {k: record.get(k) for k in ("line", "slot", "status", "stage", "version", "reason")}
        return PokeReturnValue(is_done=record["status"] != RUNNING, xcom_value=summary)

    due = due_lines()
    define_line() >> due
    run_line.expand(run=due)


jipfed_nightly()
