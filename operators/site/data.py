"""The site's data preparation as four tasks: cohort → fetch → convert → preprocess.

Each task runs one function of :mod:`jipfed.tasks.site_data` (in this process, or as the pod
``jipfed task <step>`` when the identity's ``execution`` says so) and returns the path of the
JSON file it wrote. These files hold study and series UIDs: like the run folder they stay on site.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from jipfed.operators.compat import Context
from jipfed.operators.hooks.pacs_hook import PacsHook
from jipfed.operators.site.base import SiteOperator, SiteRun

from jipfed.tasks import site_data
from jipfed.tasks.site_data import (
    COHORT_FILE,
    CONVERT_FILE,
    FETCH_FILE,
    PREPARED_FILE,
    cases_from_json,
    cases_to_json,
)

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


class SelectCohortOperator(DataStageOperator):
    """Query the PACS (QIDO-RS) for the studies of the work item's dataset; write ``cohort.json``.

    Fails when the PACS cannot be queried (naming it) or the dataset has no case.
    Returns (XCom): the path of ``cohort.json``.
    """

    step = "cohort"
    function = "select_cohort"


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
