"""JIP Federated central DAG (Apache Airflow 2.11 and 3.x): one DAG run = one step of an experiment.

### Starting an experiment
Trigger the DAG with the form. Its fields (experiment name, sites, rounds, strategy and its
settings, compute plan, local training, quorum, round timeout, transport, encoding, seed) become
the experiment's config, stored once in the model store (Connection `jipfed_model_store_default`).
Leave **Step** empty. Triggering again with the same name and settings resumes the experiment;
other settings under a used name fail the run and change nothing. **Privacy**: differential
privacy at client level (each site's update clipped, Gaussian noise on their sum at the central,
ε per round and in total in every round's `aggregate.json`; a plan beyond the ε budget is refused
at start) or at sample level (DP-SGD at each site, each site's ε recorded); secure aggregation
(pairwise masks: sites exchange X25519 keys through the central endpoint, the central stores only
masked vectors and unmasks their sum; a site that drops out after key agreement makes the round
retry without it, recorded in `aggregate.json`). With client DP and secure aggregation each site
clips its update and adds its share of the noise before masking, so the central never holds an
un-noised sum. Combinations that cannot work are refused at start with the reason (e.g. median +
secure aggregation, adaptive clipping + secure aggregation).

### What a run does
Three steps on the critical path, each a task in the grid:
`open_step` starts or resumes the experiment, decides the step (the experiment's next open
step), records its dispatch with a deadline (now + round timeout) and hands it to every selected
site: push transport triggers the site's DAG (Connection `jipfed_site_<site-id>`; a site that
cannot be reached gets its failure recorded, the others go on, each site's outcome is in the log),
pull transport leaves it for the sites to pull → `collect_update` (one per site, deferrable)
waits until the site delivered, reported a failure (skipped) or timed out (skipped, recorded) →
`close_step` aggregates with the quorum rule (too few updates fail the run and leave the global
model untouched), dispatches and pushes the next step at once (the sites start while the central
moves on) and triggers the run of that step (run id `jipfed__<exp>__step<nnnn>`, conf
`{"experiment", "step"}`), or after the last step finalizes: publishes the final model under
`experiments/<exp>/final/` with the report. Beside the collect tasks, off the critical path,
`record_metrics` rewrites the report under `experiments/<exp>/report/` from the steps aggregated
so far (a run reports the steps before its own) and logs the per-round table.

**A failed report fails the run, not the step.** `record_metrics` is a leaf of the run, like
`close_step`, so its failure marks the run failed in the grid, while `close_step` still closes
the step (aggregates it, opens and triggers the next one): a report must not stop the training,
and the next run rebuilds the report from the store anyway. It is not retried, for the same
reason. (The alternative, `close_step` failing after its work when the report failed, cannot be
done on Airflow 3, where triggering the next run ends that task.) The report `close_step` writes
when it finalizes stays the last one: `record_metrics` writes its report again when a step was
aggregated while it wrote.

### Resuming
All state lives in the model store, not in this Airflow: clearing a failed run re-runs its step
(idempotently; after the round timeout the step is dispatched again as a new attempt), a cleared
run of an earlier step continues with the next open step, and after a restart of the central
Airflow, triggering the experiment (same settings, or conf `{"experiment": ..., "step": n}`)
continues where it stopped. `max_active_runs=1`: a triggered run waits until the previous one
has finished (experiments therefore run one step at a time, one after the other). It costs one
scheduler loop per step, since `close_step` is the last task of a run and the sites already have
the next step; it keeps one central run at a time writing an experiment's state.
"""

from __future__ import annotations

import datetime as dt
import os

from jipfed.operators.central import CloseStepOperator, OpenStepOperator, RecordMetricsOperator
from jipfed.operators.compat import Param, TriggerRule, dag
from jipfed.operators.sensors.collect_update import CollectUpdateSensor

from jipfed.central.params import CHAIN_PARAMS, PARAMS
from jipfed.central.params import ui_forms as kaapana_ui_forms

DAG_ID = "jipfed_central"

#: Kaapana's workflow form (the same params); Kaapana reads it from here and from default_args.
ui_forms = kaapana_ui_forms()
#: Seconds between full checks for a site's update; None = 1 s (up to 5 s for round timeouts over 10
#: minutes). A delivery is seen sooner: the trigger looks for the update itself every 0.1 s (1 s on S3).
POLL_INTERVAL_S = (
    float(os.environ["JIPFED_POLL_INTERVAL_S"]) if os.environ.get("JIPFED_POLL_INTERVAL_S") else None
)


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    params={name: Param(**spec) for name, spec in {**PARAMS, **CHAIN_PARAMS}.items()},
    # Every task is idempotent (state in the store): retries ride out a crashed worker or scheduler.
    # Kaapana reads ui_visible / ui_forms from default_args.
    default_args={
        "retries": 2,
        "retry_delay": dt.timedelta(seconds=5),
        "ui_visible": True,
        "ui_forms": ui_forms,
    },
    doc_md=__doc__,
    tags=["jipfed", "federated-learning", "central"],
)
def jipfed_central() -> None:
    opened = OpenStepOperator(task_id="open_step")
    experiment, step = opened.output["experiment"], opened.output["step"]
    collect = CollectUpdateSensor.partial(
        task_id="collect_update", experiment=experiment, step=step, poll_interval_s=POLL_INTERVAL_S
    ).expand(site=opened.output)  # no step in the run: mapped over nothing, skipped
    # the step as a template: None (no step in the run) renders as None, where an XComArg fails
    # a leaf beside the collect tasks: its failure fails the run (see "A failed report" above)
    metrics = RecordMetricsOperator(
        task_id="record_metrics",
        experiment=experiment,
        step="{{ ti.xcom_pull(task_ids='open_step', key='step') }}",
        retries=0,
    )
    # all_done: it also runs when a site's collect failed; it reads open_step's XComs itself and
    # skips when there are none.
    close = CloseStepOperator(
        task_id="close_step", open_task_id="open_step", trigger_rule=TriggerRule.ALL_DONE
    )
    opened >> collect >> close
    opened >> [close, metrics]


jipfed_central()
