"""The site's data preparation as four tasks: cohort → fetch → convert → preprocess.

Each task runs one function of :mod:`jipfed.tasks.site_data` (in this process, or as the pod
``jipfed task <step>`` when the identity's ``execution`` says so) and returns the path of the
JSON file it wrote. These files hold study and series UIDs: like the run folder they stay on site.

Cached rounds cost one task, not four: when every series of the cohort is in the site's DICOM
cache, the cohort task also runs the (cached) fetch, convert and preprocess steps in-process,
writing their files into their tasks' out dirs, and skips those tasks; the grid shows them as
separate tasks only in runs where they fetch and convert.
"""

from __future__ import annotations

from collections.abc import Sequence
from logging import Logger
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from jipfed.operators.compat import AIRFLOW_V3, Context
from jipfed.operators.hooks.pacs_hook import PacsHook
from jipfed.operators.site.base import SiteOperator, SiteRun, skip_tasks, task_errors

from jipfed.tasks import site_data, site_model
from jipfed.tasks.run import make_run, read_json
from jipfed.tasks.site_data import (
    COHORT_FILE,
    CONVERT_FILE,
    FETCH_FILE,
    PREPARED_FILE,
    cases_from_json,
    cases_to_json,
)

if AIRFLOW_V3:
    from airflow.sdk.bases.branch import BranchMixIn
else:
    from airflow.operators.branch import BranchMixIn

if TYPE_CHECKING:  # imports the DICOM stack: only at run time
    from jipfed.imaging.pacs import PacsConfig

__all__ = [
    "COHORT_FILE",
    "CONVERT_FILE",
    "FETCH_FILE",
    "PREPARED_FILE",
    "ConvertOperator",
    "DataStageOperator",
    "FetchDicomOperator",
    "PreprocessOperator",
    "SelectCohortOperator",
    "cases_from_json",
    "cases_to_json",
    "prepare_cached_round",
    "run_cached_stages",
]


class DataStageOperator(SiteOperator):
    """A data preparation stage: its step function gets the run and the PACS from the identity's Connection."""

    connections = ("pacs",)
    #: The name of the stage's function in :mod:`jipfed.tasks.site_data`.
    function: ClassVar[str] = ""

    def execute(self, context: Context) -> str:
        step = getattr(site_data, self.function)
        return self.run_step(context, lambda run: step(run, self._pacs(run)))

    def _pacs(self, run: SiteRun) -> PacsConfig:
        return PacsHook(run.identity.pacs_conn_id).get_conn()


class SelectCohortOperator(DataStageOperator, BranchMixIn):
    """Query the PACS (QIDO-RS) for the studies of the work item's dataset; write ``cohort.json``.

    With ``cached_stages`` (the task ids of fetch, convert and preprocess, in order): when every
    series of the cohort is in the site's DICOM cache and none of those steps runs as a pod, also
    run them here (in-process, each writing into its own task's out dir, so the tasks after
    preprocess read what they always read) and skip those tasks, all at once.

    Fails when the PACS cannot be queried (naming it) or the dataset has no case.
    Returns (XCom): the path of ``cohort.json``.
    """

    step = "cohort"
    function = "select_cohort"
    inherits_from_skipmixin = True  # Airflow 3: the scheduler lets this task skip its downstream

    def __init__(self, *, cached_stages: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if cached_stages and len(cached_stages) != 3:
            raise ValueError(f"cached_stages must name fetch, convert and preprocess, got {cached_stages!r}")
        self.cached_stages = tuple(cached_stages)

    def execute(self, context: Context) -> str:
        cohort = super().execute(context)
        if self.cached_stages and self._prepare_from_cache(context, cohort):
            context["ti"].xcom_push(key="return_value", value=cohort)  # Airflow 3 ends the task when it skips
            skip_tasks(self, context, self.cached_stages)
        return cohort

    def _prepare_from_cache(self, context: Context, cohort_file: str) -> bool:
        """Run the cached stages here when the cohort is cached; False (nothing done) otherwise."""
        run = self.site_run(context)
        stages = [self.dag.get_task(task_id) for task_id in self.cached_stages]
        if any(run.identity.execution.runs_in_pod(str(stage.step)) for stage in stages):
            return False
        return run_cached_stages(run, Path(cohort_file), stages, self._pacs(run), self.log)


def stage_run(run: SiteRun, stage: SiteOperator) -> SiteRun:
    """``run`` (identity, folder, work item) as the task ``stage`` sees it (its in and out dirs)."""
    return make_run(
        run.identity,
        run.run_dir,
        operator_in_dir=stage.operator_in_dir,
        operator_out_dir=stage.operator_out_dir,
        work_data=run.work_data,
    )


def run_cached_stages(
    run: SiteRun, cohort_file: Path, stages: Sequence[DataStageOperator], pacs: PacsConfig, log: Logger
) -> bool:
    """Run ``stages`` (fetch, convert, preprocess) in-process, each into its own task's out dir,
    when every series of the cohort in ``cohort_file`` is in the site's DICOM cache.

    Returns False (nothing run) when a series is missing.
    """
    from jipfed.imaging.dicom_cache import DicomCache

    cases = cases_from_json(read_json(cohort_file, f"{run.where}: {COHORT_FILE}")["cases"])
    cache = DicomCache(run.identity.data_root)
    missing = sum(not cache.is_cached(ref) for case in cases for ref in case.series)
    if missing:
        log.info("%s: %d series not in the DICOM cache: fetch, convert, preprocess run", run.where, missing)
        return False
    for stage in stages:
        with task_errors():
            written = getattr(site_data, stage.function)(stage_run(run, stage), pacs)
        log.info("%s: %s (cached) wrote %s", run.where, stage.task_id, written)
    return True


def prepare_cached_round(
    dag: Any, run: SiteRun, *, cohort_task_id: str, model_task_id: str, log: Logger
) -> bool:
    """Do the work of ``cohort_task_id`` (with its cached stages) and ``model_task_id`` in this task
    when they only hit caches: the cohort query finds every series in the DICOM cache, nothing runs
    as a pod. Each writes into its own task's out dir, so the training reads what it always reads.

    ``run`` is the work task's run with the work item. Returns False when the round needs the
    separate tasks (a series to fetch, a pod, or any error here: the tasks then run and report it).
    """
    from jipfed.operators.site.model import central

    cohort = dag.get_task(cohort_task_id)
    stages = [dag.get_task(task_id) for task_id in cohort.cached_stages]
    model = dag.get_task(model_task_id)
    if not stages or any(run.identity.execution.runs_in_pod(str(op.step)) for op in [cohort, *stages, model]):
        return False
    try:
        pacs = PacsHook(run.identity.pacs_conn_id).get_conn()
        with task_errors():
            cohort_file = site_data.select_cohort(stage_run(run, cohort), pacs)
        if not run_cached_stages(run, Path(cohort_file), stages, pacs, log):
            return False
        model_run = stage_run(run, model)
        with task_errors():
            site_model.get_global_model(model_run, central(model_run))
    except Exception as exc:  # the separate tasks run, fail there and report it to the central
        log.warning("%s: preparing the round here failed, the separate tasks run: %s", run.where, exc)
        return False
    log.info("%s: cohort cached: %s, its stages and %s ran here", run.where, cohort_task_id, model_task_id)
    return True


class FetchDicomOperator(DataStageOperator):
    """Fetch the cohort's series that are not in the site's DICOM cache yet; write ``fetch.json``.

    Per series failures are reported and the complete cases go on; the task fails, naming the
    PACS, when nothing could be fetched and no case is complete. Each series of a complete case is
    linked (symlink to the cache) as ``<run>/batch/<SeriesInstanceUID>/<operator_out_dir>`` so
    Kaapana operators can read it. Returns (XCom): the path of ``fetch.json``.
    """

    step = "fetch"
    function = "fetch"


class ConvertOperator(DataStageOperator):
    """Convert the fetched cases to NIfTI (cached by content hash); write ``convert.json``.

    Fails when no case could be converted. Returns (XCom): the path of ``convert.json``.
    """

    step = "convert"
    function = "convert"


class PreprocessOperator(DataStageOperator):
    """Preprocess the converted cases (MONAI, cached); write ``prepared.json`` and the run's report.

    ``prepared.json`` holds ``preprocessed_dir`` (the folder ``SiteData.from_dir`` reads) and
    ``ready_cases``; the complete ``PrepareReport`` also goes to ``<data_root>/reports/``. Fails when
    no case is ready. Returns (XCom): the path of ``prepared.json``.
    """

    step = "preprocess"
    function = "preprocess"
