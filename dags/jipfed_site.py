"""JIP Federated: the site DAGs (Apache Airflow), the same file at every hospital.

One run answers one step of a federated experiment: it takes the step from the central, prepares
the site's data from its PACS (cached: later rounds do no DICOM work), trains locally from the
global model and uploads the update. Two DAGs run the same chain:

* ``jipfed_site`` (push): the central triggers it with conf ``{"experiment", "round", "step"}``;
* ``jipfed_site_pull`` (pull, ``@continuous``, starts paused): its first task waits until the
  central lists work for this site (a long poll: the central answers when the step is dispatched;
  first up to a minute in the worker, then in the triggerer); the site needs no inbound port.

Composition only; the operators live in ``jipfed.operators``. See ``DOC`` for the configuration.
"""

from __future__ import annotations

import datetime as dt
import os

from jipfed.operators.compat import DAG, BaseOperator, Param, TriggerRule, chain
from jipfed.operators.sensors.central_work import CentralWorkSensor
from jipfed.operators.site import (
    CleanupRunFolderOperator,
    ConvertOperator,
    FetchDicomOperator,
    GetGlobalModelOperator,
    GetWorkOperator,
    PreprocessOperator,
    SelectCohortOperator,
    TrainLocalOperator,
    UploadUpdateOperator,
    hosted_sites,
    identity_variable,
    report_failure_to_central,
)
from jipfed.operators.site.requests import AnswerRequestsOperator, SiteRequestsSensor

START_DATE = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
TAGS = ["jipfed", "federated-learning", "site"]
#: Pull mode: seconds between polls of the central for work (a step waits at most this long for the
#: site to notice it; a poll is one small GET) and for the central's requests (census, evaluation:
#: nothing waits on them), and idle seconds after which a run ends (skipped).
#: ``JIPFED_POLL_INTERVAL_S`` sets both.
POLL_INTERVAL_S = float(os.environ.get("JIPFED_POLL_INTERVAL_S", "5"))
REQUESTS_POLL_INTERVAL_S = float(os.environ.get("JIPFED_POLL_INTERVAL_S", "30"))
#: Pull mode: the central holds each work poll until a step is dispatched (long poll, up to 25 s), so
#: the interval above matters only with a central without it. A pull run waits this many seconds in
#: the worker before it hands the wait to the triggerer: the next step usually comes seconds after
#: the last one ended, and work found in the worker starts without the triggerer's and the
#: scheduler's round trip. ``JIPFED_WORKER_WAIT_S`` sets it (0: defer at once).
WORKER_WAIT_S = float(os.environ.get("JIPFED_WORKER_WAIT_S", "60"))
IDLE_TIMEOUT_S = 3600
#: The tasks the work task does itself on a cached round (cohort with its cached stages, model).
PREPARE = ("select_cohort", "get_global_model")
#: Every task is safe to re-run (caches, write-once upload): one retry rides out a worker crash.
DEFAULT_ARGS = {"retries": 1, "retry_delay": dt.timedelta(seconds=5)}

DOC = """
### JIP Federated site DAG

Same file at every site; the site's identity comes from configuration:

* **Variable `{variable}`** (JSON): `{{"site_id": "site-a", "data_root": "/data/jipfed"}}` and
  optionally `pacs_conn_id`, `central_conn_id`, `fetch_transport` (`dicomweb`/`cget`),
  `default_dataset`, `workflow_dir` (default `<data_root>/workflows`), `preprocess`
  (`spacing_mm`, `spatial_size`), `device`.
* **Connection `jipfed_central_default`** (http): host = the central endpoint's URL with its
  `/jipfed` prefix, password = this site's token (`jipfed site-token --site <id>` at the central).
* **Connection `jipfed_pacs_default`** (jipfed_pacs): the PACS' DICOMweb URL, user, password,
  extra `dimse_port` for C-GET.

Tasks: work → select_cohort → fetch_dicom → convert → preprocess → train_local → upload_update →
cleanup (teardown: deletes the run folder, never the caches in `data_root`), with get_global_model
beside the data preparation. Cached rounds (every series of the cohort in the DICOM cache): the
work task itself queries the cohort, runs the cached fetch, convert and preprocess steps and
downloads the model, and skips those tasks, so training starts right after it (grid: work →
train_local → upload_update). When only `select_cohort` finds the cohort cached, it runs the cached
steps itself and skips fetch → preprocess. A failing task after the work is known reports the
failure to the central.
New DAGs start paused: unpause `jipfed_site` to accept steps the central pushes, or
`jipfed_site_pull` to poll for them (use one of the two). The pull DAG's `wait_for_work` long-polls
the central (it answers as soon as a step is dispatched): for the first minute of a run from the
worker (the next step usually follows the last within seconds, and it starts at once from there),
then from the triggerer, holding no worker slot (`JIPFED_WORKER_WAIT_S` sets the minute; 0: at once). Model lines' census and federated
evaluation (the final model's score on every site) need `jipfed_site_requests` unpaused at push and
pull sites alike: it polls the central (outbound only) and answers with numbers. One Airflow can host several sites (demo): `JIPFED_HOSTED_SITES=site-a,site-b` makes one DAG
set per site, reading the Variable `jipfed_site__<id>`.
"""


def site_chain(work: BaseOperator, *, site_variable: str, hosted_site: str | None) -> None:
    """The tasks after ``work`` (the task returning the work item), chained after it."""
    site = {"site_variable": site_variable, "hosted_site": hosted_site}
    after_work = {**site, "work_task_id": work.task_id, "on_failure_callback": report_failure_to_central}
    cached = ("fetch_dicom", "convert", "preprocess")
    cohort = SelectCohortOperator(task_id=PREPARE[0], cached_stages=cached, **after_work)
    fetch = FetchDicomOperator(task_id=cached[0], input_operator=cohort, **after_work)
    convert = ConvertOperator(task_id=cached[1], input_operator=fetch, **after_work)
    preprocess = PreprocessOperator(task_id=cached[2], input_operator=convert, **after_work)
    model = GetGlobalModelOperator(task_id=PREPARE[1], **after_work)
    train = TrainLocalOperator(
        task_id="train_local",
        input_operator=preprocess,
        model_operator=model,
        # preprocess is skipped when select_cohort prepared the cached data itself
        trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
        **after_work,
    )
    upload = UploadUpdateOperator(task_id="upload_update", input_operator=train, **after_work)
    cleanup = CleanupRunFolderOperator(task_id="cleanup", **site)
    # The model download runs beside the (cached) data preparation; both feed the training. When
    # the cohort is cached, the work task (or else select_cohort) prepares the data itself and
    # skips the tasks it did: train_local follows whichever ran.
    chain(work, cohort, fetch, convert, preprocess, train, upload, cleanup)
    chain(work, model, train)
    cohort >> train
    work >> train


def site_dags(hosted_site: str | None) -> list[DAG]:
    """The push, the pull and the requests DAG of one site identity."""
    suffix = "" if hosted_site is None else f"__{hosted_site}"
    variable = identity_variable(hosted_site)
    doc = DOC.format(variable=variable)
    with DAG(
        dag_id=f"jipfed_site{suffix}",
        description="JIP Federated site: answer one step the central triggered (push)",
        schedule=None,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,  # runs share the site's caches and its preprocessed index
        default_args=DEFAULT_ARGS,
        tags=TAGS,
        doc_md=doc,
        params={
            "experiment": Param(
                type="string", pattern="^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", title="Experiment"
            ),
            "round": Param(type="integer", minimum=0, title="Round"),
            "step": Param(type="integer", minimum=0, title="Plan step"),
        },
    ) as push:
        work = GetWorkOperator(
            task_id="get_work", site_variable=variable, hosted_site=hosted_site, prepare=PREPARE
        )
        site_chain(work, site_variable=variable, hosted_site=hosted_site)
    # the polling DAGs: always one run that waits for the central, started by the scheduler
    polling = {
        "schedule": "@continuous",
        "start_date": START_DATE,
        "catchup": False,
        "max_active_runs": 1,
        "is_paused_upon_creation": True,
        "default_args": DEFAULT_ARGS,
        "doc_md": doc,
    }
    with DAG(
        dag_id=f"jipfed_site_pull{suffix}",
        description="JIP Federated site: poll the central for work and answer it (pull)",
        tags=[*TAGS, "pull"],
        **polling,
    ) as pull:
        wait = CentralWorkSensor(
            task_id="wait_for_work",
            site_variable=variable,
            hosted_site=hosted_site,
            poke_interval=POLL_INTERVAL_S,
            worker_wait_s=WORKER_WAIT_S,
            timeout=IDLE_TIMEOUT_S,
            soft_fail=True,
            prepare=PREPARE,
        )
        site_chain(wait, site_variable=variable, hosted_site=hosted_site)
    with DAG(
        dag_id=f"jipfed_site_requests{suffix}",
        description="JIP Federated site: answer the central's census and evaluation requests (numbers only)",
        tags=[*TAGS, "requests"],
        **polling,
    ) as requests:
        chain(
            SiteRequestsSensor(
                task_id="wait_for_requests",
                site_variable=variable,
                hosted_site=hosted_site,
                poke_interval=REQUESTS_POLL_INTERVAL_S,
                timeout=IDLE_TIMEOUT_S,
            ),
            AnswerRequestsOperator(
                task_id="answer_requests", site_variable=variable, hosted_site=hosted_site
            ),
        )
    return [push, pull, requests]


for _hosted in hosted_sites():
    for _dag in site_dags(_hosted):
        globals()[_dag.dag_id] = _dag
