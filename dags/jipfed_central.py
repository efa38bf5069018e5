"""JIP Federated central DAG (Apache Airflow 2.11 and 3.x): one DAG run = one step of an experiment.

### Starting an experiment
Trigger the DAG with the form. Its fields (experiment name, sites, rounds, strategy and its
settings, compute plan, local training, quorum, round timeout, transport, encoding, seed) become
the experiment's config, stored once in the model store (Connection `jipfed_model_store_default`).
Leave **Step** empty. Triggering again with the same name and settings resumes the experiment;
other settings under a used name fail the run and change nothing. **Privacy**: differential
privacy at client level (each site's update clipped, Gaussian noise on their sum at the central,
ε per round and in total in every round's `aggregate.json`; a plan beyond the ε budget is refused
at start); sample level (DP-SGD) and secure aggregation are refused at start with the reason
(not wired into the round yet), as is any combination that cannot work (e.g. median + secure
aggregation).

### What a run does
`start` decides the step (the experiment's next open step) → `dispatch_step` records it with a
deadline (now + round timeout) → `dispatch_to_site` (one per selected site) triggers the site's
DAG (push, Connection `jipfed_site_<site-id>`) or leaves the step for the site to pull →
`collect_update` (one per site, deferrable) waits until the site delivered, reported a failure
(skipped) or timed out (skipped, recorded) → `aggregate` applies the quorum: too few updates fail
the run and leave the global model untouched → `record_metrics` rewrites the report under
`experiments/<exp>/report/` and logs the per-round table → `next_step` triggers the run of the
next step (run id `jipfed__<exp>__step<nnnn>`, conf `{"experiment", "step"}`), or `finalize`
publishes the final model under `experiments/<exp>/final/`.

### Resuming
All state lives in the model store, not in this Airflow: clearing a failed run re-runs its step
(idempotently; after the round timeout the step is dispatched again as a new attempt), a cleared
run of an earlier step continues with the next open step, and after a restart of the central
Airflow, triggering the experiment (same settings, or conf `{"experiment": ..., "step": n}`)
continues where it stopped. `max_active_runs=1`: a triggered run waits until the previous one
has finished (experiments therefore run one step at a time, one after the other).
"""

from __future__ import annotations

import datetime as dt
import os

from jipfed.operators.central import (
    AggregateStepOperator,
    DispatchStepOperator,
    DispatchToSiteOperator,
    FinalizeOperator,
    NextStepOperator,
    RecordMetricsOperator,
    StartExperimentOperator,
    route_after_start,
    route_after_step,
)
from jipfed.operators.compat import Param, TriggerRule, dag, task
from jipfed.operators.sensors.collect_update import CollectUpdateSensor

from jipfed.central.params import CHAIN_PARAMS, PARAMS
from jipfed.central.params import ui_forms as kaapana_ui_forms

DAG_ID = "jipfed_central"

#: Kaapana's workflow form (the same params); Kaapana reads it from here and from default_args.
ui_forms = kaapana_ui_forms()
#: Seconds between checks for a site's update; None = about 1 % of the round timeout (1-30 s).
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
    start = StartExperimentOperator(task_id="start")
    experiment, step = start.output["experiment"], start.output["step"]
    route = task.branch(task_id="route")(route_after_start)(
        start.output, run_step="dispatch_step", after_step="route_next"
    )
    dispatch = DispatchStepOperator(task_id="dispatch_step", experiment=experiment, step=step)
    to_sites = DispatchToSiteOperator.partial(
        task_id="dispatch_to_site", experiment=experiment, step=step
    ).expand(site=dispatch.output)
    collect = CollectUpdateSensor.partial(
        task_id="collect_update",
        experiment=experiment,
        step=step,
        poll_interval_s=POLL_INTERVAL_S,
        trigger_rule=TriggerRule.NONE_FAILED,
    ).expand(site=dispatch.output)
    # Trigger rule all_done also runs it when the run has no step or `start` failed: it pulls the XComs
    # itself (a missing one is None with native rendering, where an XComArg fails) and skips on None.
    aggregate = AggregateStepOperator(
        task_id="aggregate",
        experiment="{{ ti.xcom_pull(task_ids='start', key='experiment') }}",
        step="{{ ti.xcom_pull(task_ids='start', key='step') }}",
    )
    start >> aggregate
    metrics = RecordMetricsOperator(task_id="record_metrics", experiment=experiment)
    route_next = task.branch(task_id="route_next", trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)(
        route_after_step
    )(start.output, next_step="next_step", finalize="finalize")
    next_step = NextStepOperator(task_id="next_step", experiment=experiment, step=step)
    final = FinalizeOperator(task_id="finalize", experiment=experiment)

    # The report is written beside the next step's trigger, off the rounds' critical path.
    route >> dispatch >> to_sites >> collect >> aggregate >> [metrics, route_next]
    route_next >> [next_step, final]
    route >> route_next


jipfed_central()
