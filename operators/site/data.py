"""The site's data preparation as four tasks: cohort → fetch → convert → preprocess.

Each task calls one stage of :mod:`jipfed.imaging.pipeline` and writes a JSON file to its out
dir that carries what the next stage needs plus the counters gathered so far (``report``, the
fields of :class:`~jipfed.imaging.pipeline.PrepareReport`, and ``seconds`` per stage). The last
task writes the complete report to ``<data_root>/reports/`` as ``prepare_site`` does. The stages
cache in ``data_root`` (fetch by SeriesInstanceUID, convert and preprocess by content hash), so
a run with nothing new in the PACS fetches, converts and preprocesses nothing. These files hold
study and series UIDs: like everything in the run folder they stay on site.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from jipfed.operators.compat import AirflowException, AirflowFailException, Context
from jipfed.operators.hooks.pacs_hook import PacsHook
from jipfed.operators.site.base import BATCH_NAME, SiteOperator, SiteRun, read_json, write_json

from jipfed.cohort.model import CohortCase, SeriesRef

if TYPE_CHECKING:  # the imaging modules import MONAI and torch: only at run time, not at DAG parsing
    from jipfed.imaging.pipeline import SiteDataConfig

COHORT_FILE = "cohort.json"
FETCH_FILE = "fetch.json"
CONVERT_FILE = "convert.json"
PREPARED_FILE = "prepared.json"


def cases_to_json(cases: Iterable[CohortCase]) -> list[dict[str, Any]]:
    return [{"study_uid": c.study_uid, "series": [asdict(ref) for ref in c.series]} for c in cases]


def cases_from_json(data: Sequence[dict[str, Any]]) -> list[CohortCase]:
    return [CohortCase(c["study_uid"], tuple(SeriesRef(**ref) for ref in c["series"])) for c in data]


class DataStageOperator(SiteOperator):
    """A data preparation stage: builds the ``SiteDataConfig`` from the identity, PACS and work item."""

    def data_config(self, run: SiteRun) -> SiteDataConfig:
        """The site's data settings; the dataset is the work item's, else the identity's default."""
        from jipfed.imaging.pipeline import SiteDataConfig

        identity, work = run.identity, run.require_work()
        pacs = PacsHook(identity.pacs_conn_id).get_conn()
        try:
            return SiteDataConfig(
                site_id=identity.site_id,
                pacs=pacs,
                data_root=identity.data_root,
                dataset=work.dataset or identity.default_dataset,
                transport=identity.fetch_transport,
                preprocess=identity.preprocess,
            )
        except ValueError as exc:
            raise AirflowFailException(f"{run.where}: {exc}") from exc

    def pacs_name(self, run: SiteRun, cfg: SiteDataConfig) -> str:
        """``PACS <url> (Connection '<id>')`` for messages."""
        return f"PACS {cfg.pacs.dicomweb_url} (Connection {run.identity.pacs_conn_id!r})"

    def stage_input(self, run: SiteRun, name: str) -> dict[str, Any]:
        """The JSON file ``name`` the upstream stage wrote into this task's in dir."""
        return read_json(self.input_path(run, name), f"{run.where}: {name}")


def extend_report(upstream: dict[str, Any], stage: str, started: float, **report: Any) -> dict[str, Any]:
    """The upstream report and seconds extended by this stage's counters and wall time."""
    return {
        "report": {**upstream.get("report", {}), **report},
        "seconds": {**upstream.get("seconds", {}), stage: round(time.perf_counter() - started, 3)},
    }


class SelectCohortOperator(DataStageOperator):
    """Query the PACS (QIDO-RS) for the studies of the work item's dataset; write ``cohort.json``.

    Fails when the PACS cannot be queried (naming it) or the dataset has no case.
    Returns (XCom): the path of ``cohort.json``.
    """

    def execute(self, context: Context) -> str:
        from jipfed.imaging.pacs import PacsError
        from jipfed.imaging.pipeline import select_cases

        started = time.perf_counter()
        run = self.site_run(context)
        cfg = self.data_config(run)
        try:
            cases = select_cases(cfg)
        except PacsError as exc:
            raise AirflowException(
                f"{run.where}: cohort query on {self.pacs_name(run, cfg)} failed: {exc}"
            ) from exc
        if not cases:
            raise AirflowFailException(
                f"{run.where}: {self.pacs_name(run, cfg)} has no study with StudyDescription "
                f"{cfg.dataset!r} (modalities MR + SEG): nothing to train on"
            )
        n_series = sum(len(c.series) for c in cases)
        self.log.info("%s: cohort %r: %d case(s), %d series", run.where, cfg.dataset, len(cases), n_series)
        data = {
            "dataset": cfg.dataset,
            "cases": cases_to_json(cases),
            **extend_report(
                {},
                "cohort",
                started,
                site_id=cfg.site_id,
                transport=cfg.transport,
                cohort_cases=len(cases),
                cohort_series=n_series,
            ),
        }
        return str(write_json(run.out_dir / COHORT_FILE, data))


class FetchDicomOperator(DataStageOperator):
    """Fetch the cohort's series that are not in the site's DICOM cache yet; write ``fetch.json``.

    Per series failures are reported and the complete cases go on; the task fails, naming the
    PACS, when nothing could be fetched and no case is complete. Each series of a complete case is
    linked (symlink to the cache) as ``<run>/batch/<SeriesInstanceUID>/<operator_out_dir>`` so
    Kaapana operators can read it.
    Returns (XCom): the path of ``fetch.json``.
    """

    def execute(self, context: Context) -> str:
        from jipfed.imaging.convert import case_key_for
        from jipfed.imaging.pipeline import fetch_cases

        started = time.perf_counter()
        run = self.site_run(context)
        cfg = self.data_config(run)
        cohort = self.stage_input(run, COHORT_FILE)
        cases = cases_from_json(cohort["cases"])
        report, complete = fetch_cases(cfg, cases)
        for uid, reason in report.failed:
            self.log.warning("%s: series %s not fetched: %s", run.where, uid, reason)
        if not complete:
            first = report.failed[0][1] if report.failed else "no series"
            raise AirflowException(
                f"{run.where}: no complete case could be fetched from {self.pacs_name(run, cfg)}: "
                f"{len(report.failed)} series failed (first: {first})"
            )
        self._link_batch(run, cfg, complete)
        self.log.info(
            "%s: fetched %d series, %d cached, %d failed; %d of %d case(s) complete",
            run.where,
            report.fetched,
            report.cached,
            len(report.failed),
            len(complete),
            len(cases),
        )
        done = {c.study_uid for c in complete}
        data = {
            "cases": cases_to_json(complete),
            "incomplete": sorted(case_key_for(c.study_uid) for c in cases if c.study_uid not in done),
            **extend_report(
                cohort,
                "fetch",
                started,
                fetched=report.fetched,
                fetch_cached=report.cached,
                fetch_failed=[list(item) for item in report.failed],
            ),
        }
        return str(write_json(run.out_dir / FETCH_FILE, data))

    def _link_batch(self, run: SiteRun, cfg: SiteDataConfig, cases: Sequence[CohortCase]) -> None:
        from jipfed.imaging.dicom_cache import DicomCache

        cache = DicomCache(cfg.data_root)
        for case in cases:
            for ref in case.series:
                link = run.run_dir / BATCH_NAME / ref.series_uid / self.operator_out_dir
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.is_symlink():
                    os.symlink(cache.series_dir(ref), link, target_is_directory=True)


class ConvertOperator(DataStageOperator):
    """Convert the fetched cases to NIfTI (cached by content hash); write ``convert.json``.

    Fails when no case could be converted. Returns (XCom): the path of ``convert.json``.
    """

    def execute(self, context: Context) -> str:
        from jipfed.imaging.pipeline import convert_fetched

        started = time.perf_counter()
        run = self.site_run(context)
        cfg = self.data_config(run)
        fetched = self.stage_input(run, FETCH_FILE)
        conversion = convert_fetched(cfg, cases_from_json(fetched["cases"]))
        keys = sorted([*conversion.converted, *conversion.cached])
        skipped = [[key, reason] for key, _folder, reason in conversion.skipped]
        skipped += [[key, "not all series fetched"] for key in fetched["incomplete"]]
        for key, reason in skipped:
            self.log.warning("%s: case %s skipped: %s", run.where, key, reason)
        if not keys:
            raise AirflowFailException(f"{run.where}: no case could be converted to NIfTI: {skipped}")
        self.log.info(
            "%s: %d case(s) converted, %d cached, %d skipped",
            run.where,
            len(conversion.converted),
            len(conversion.cached),
            len(skipped),
        )
        data = {
            "case_keys": keys,
            **extend_report(
                fetched,
                "convert",
                started,
                converted=len(conversion.converted),
                convert_cached=len(conversion.cached),
                convert_skipped=skipped,
            ),
        }
        return str(write_json(run.out_dir / CONVERT_FILE, data))


class PreprocessOperator(DataStageOperator):
    """Preprocess the converted cases (MONAI, cached); write ``prepared.json`` and the run's report.

    ``prepared.json`` holds ``preprocessed_dir`` (the folder ``SiteData.from_dir`` reads) and
    ``ready_cases``; the complete ``PrepareReport`` also goes to ``<data_root>/reports/``. Fails when
    no case is ready. Returns (XCom): the path of ``prepared.json``.
    """

    def execute(self, context: Context) -> str:
        from jipfed.imaging.pipeline import PrepareReport, preprocess_converted, write_report

        started = time.perf_counter()
        run = self.site_run(context)
        cfg = self.data_config(run)
        converted = self.stage_input(run, CONVERT_FILE)
        pre = preprocess_converted(cfg, converted["case_keys"], progress=False)
        for key, reason in pre.failed:
            self.log.warning("%s: case %s not preprocessed: %s", run.where, key, reason)
        ready = pre.processed + pre.cached
        if ready == 0:
            raise AirflowFailException(
                f"{run.where}: no case is ready for training: {len(pre.failed)} failed preprocessing "
                f"({pre.failed[:3]})"
            )
        stages = extend_report(
            converted,
            "preprocess",
            started,
            preprocessed=pre.processed,
            preprocess_cached=pre.cached,
            preprocess_failed=[list(item) for item in pre.failed],
            ready_cases=ready,
            preprocessed_dir=str(pre.out_dir),
        )
        seconds = {**stages["seconds"], "total": round(sum(stages["seconds"].values()), 3)}
        report = PrepareReport(**stages["report"], seconds=seconds)
        report_path = write_report(cfg, report)
        self.log.info("%s: %d case(s) ready in %s; report %s", run.where, ready, pre.out_dir, report_path)
        data = {"preprocessed_dir": str(pre.out_dir), "ready_cases": ready, "report_file": str(report_path)}
        return str(write_json(run.out_dir / PREPARED_FILE, {**data, **stages}))
