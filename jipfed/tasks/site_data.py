"""The site's data preparation steps: cohort → fetch → convert → preprocess.

Each step calls one stage of :mod:`jipfed.imaging.pipeline` and writes a JSON file to its out dir
that carries what the next stage needs plus the counters gathered so far (``report``, the fields
of :class:`~jipfed.imaging.pipeline.PrepareReport`, and ``seconds`` per stage). The last step
writes the complete report to ``<data_root>/reports/`` as ``prepare_site`` does. The stages cache
in ``data_root`` (fetch by SeriesInstanceUID, convert and preprocess by content hash). These files
hold study and series UIDs: like everything in the run folder they stay on site.
Each function returns the path of the file it wrote (the operator's XCom value).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from jipfed.cohort.model import CohortCase, SeriesRef
from jipfed.tasks.errors import TaskError, TaskFailed
from jipfed.tasks.run import BATCH_NAME, SiteRun, read_json, write_json

if TYPE_CHECKING:  # the imaging modules import MONAI, pydicom and torch: only when a step runs
    from jipfed.imaging.pacs import PacsConfig
    from jipfed.imaging.pipeline import SiteDataConfig

log = logging.getLogger(__name__)

COHORT_FILE = "cohort.json"
FETCH_FILE = "fetch.json"
CONVERT_FILE = "convert.json"
PREPARED_FILE = "prepared.json"


def cases_to_json(cases: Iterable[CohortCase]) -> list[dict[str, Any]]:
    return [{"study_uid": c.study_uid, "series": [asdict(ref) for ref in c.series]} for c in cases]


def cases_from_json(data: Sequence[dict[str, Any]]) -> list[CohortCase]:
    return [CohortCase(c["study_uid"], tuple(SeriesRef(**ref) for ref in c["series"])) for c in data]


def data_config(run: SiteRun, pacs: PacsConfig) -> SiteDataConfig:
    """The site's data settings; the dataset is the work item's, else the identity's default."""
    from jipfed.imaging.pipeline import SiteDataConfig

    identity, work = run.identity, run.require_work()
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
        raise TaskFailed(f"{run.where}: {exc}") from exc


def pacs_name(run: SiteRun, cfg: SiteDataConfig) -> str:
    """``PACS <url> (Connection '<id>')`` for messages."""
    return f"PACS {cfg.pacs.dicomweb_url} (Connection {run.identity.pacs_conn_id!r})"


def stage_input(run: SiteRun, name: str) -> dict[str, Any]:
    """The JSON file ``name`` the upstream stage wrote into this task's in dir."""
    return read_json(run.input_path(name), f"{run.where}: {name}")


def extend_report(upstream: dict[str, Any], stage: str, started: float, **report: Any) -> dict[str, Any]:
    """The upstream report and seconds extended by this stage's counters and wall time."""
    return {
        "report": {**upstream.get("report", {}), **report},
        "seconds": {**upstream.get("seconds", {}), stage: round(time.perf_counter() - started, 3)},
    }


def select_cohort(run: SiteRun, pacs: PacsConfig) -> str:
    """Query the PACS (QIDO-RS) for the work item's dataset; write ``cohort.json``.

    Raises:
        TaskError: the PACS cannot be queried (named). TaskFailed: the dataset has no case.
    """
    from jipfed.imaging.pacs import PacsError
    from jipfed.imaging.pipeline import select_cases

    started = time.perf_counter()
    cfg = data_config(run, pacs)
    try:
        cases = select_cases(cfg)
    except PacsError as exc:
        raise TaskError(f"{run.where}: cohort query on {pacs_name(run, cfg)} failed: {exc}") from exc
    if not cases:
        raise TaskFailed(
            f"{run.where}: {pacs_name(run, cfg)} has no study with StudyDescription "
            f"{cfg.dataset!r} (modalities MR + SEG): nothing to train on"
        )
    n_series = sum(len(c.series) for c in cases)
    log.info("%s: cohort %r: %d case(s), %d series", run.where, cfg.dataset, len(cases), n_series)
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


def link_batch(run: SiteRun, cfg: SiteDataConfig, cases: Sequence[CohortCase]) -> None:
    """Link each series of ``cases`` (symlink to the cache) as ``<run>/batch/<series>/<out dir name>``."""
    from jipfed.imaging.dicom_cache import DicomCache

    cache = DicomCache(cfg.data_root)
    for case in cases:
        for ref in case.series:
            link = run.run_dir / BATCH_NAME / ref.series_uid / run.out_dir.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                os.symlink(cache.series_dir(ref), link, target_is_directory=True)


def fetch(run: SiteRun, pacs: PacsConfig) -> str:
    """Fetch the cohort's series not in the DICOM cache yet; write ``fetch.json``.

    Per series failures are reported and the complete cases go on; TaskError (naming the PACS)
    when no case is complete. Each series of a complete case is linked for Kaapana operators.
    """
    from jipfed.imaging.pipeline import fetch_cases, incomplete_reasons

    started = time.perf_counter()
    cfg = data_config(run, pacs)
    cohort = stage_input(run, COHORT_FILE)
    cases = cases_from_json(cohort["cases"])
    report, complete = fetch_cases(cfg, cases)
    for uid, reason in report.failed:
        log.warning("%s: series %s not fetched: %s", run.where, uid, reason)
    if not complete:
        first = report.failed[0][1] if report.failed else "no series"
        raise TaskError(
            f"{run.where}: no complete case could be fetched from {pacs_name(run, cfg)}: "
            f"{len(report.failed)} series failed (first: {first})"
        )
    link_batch(run, cfg, complete)
    log.info(
        "%s: fetched %d series, %d cached, %d failed; %d of %d case(s) complete",
        run.where,
        report.fetched,
        report.cached,
        len(report.failed),
        len(complete),
        len(cases),
    )
    data = {
        "cases": cases_to_json(complete),
        # [case_key, why]: the first failed series by number and description, and its fetch error
        "incomplete": [list(item) for item in incomplete_reasons(cases, complete, report)],
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


def convert(run: SiteRun, pacs: PacsConfig) -> str:
    """Convert the fetched cases to NIfTI (cached by content hash); write ``convert.json``.

    TaskFailed when no case could be converted.
    """
    from jipfed.imaging.pipeline import convert_fetched

    started = time.perf_counter()
    cfg = data_config(run, pacs)
    fetched = stage_input(run, FETCH_FILE)
    conversion = convert_fetched(cfg, cases_from_json(fetched["cases"]))
    keys = sorted([*conversion.converted, *conversion.cached])
    skipped = [[key, reason] for key, _folder, reason in conversion.skipped]
    skipped += [list(item) for item in fetched["incomplete"]]
    left_out = [[key, reason] for key, _where, reason in conversion.ignored]
    for key, reason in left_out:
        log.info("%s: case %s: %s", run.where, key, reason)
    for key, reason in skipped:
        log.warning("%s: case %s skipped: %s", run.where, key, reason)
    if not keys:
        raise TaskFailed(f"{run.where}: no case could be converted to NIfTI: {skipped}")
    log.info(
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
            convert_left_out=left_out,
        ),
    }
    return str(write_json(run.out_dir / CONVERT_FILE, data))


def preprocess(run: SiteRun, pacs: PacsConfig) -> str:
    """Preprocess the converted cases (MONAI, cached); write ``prepared.json`` and the run's report.

    ``prepared.json`` holds ``preprocessed_dir`` (the folder ``SiteData.from_dir`` reads) and
    ``ready_cases``; the complete ``PrepareReport`` also goes to ``<data_root>/reports/``.
    TaskFailed when no case is ready.
    """
    from jipfed.imaging.pipeline import PrepareReport, preprocess_converted, write_report

    started = time.perf_counter()
    cfg = data_config(run, pacs)
    converted = stage_input(run, CONVERT_FILE)
    pre = preprocess_converted(cfg, converted["case_keys"], progress=False)
    for key, reason in pre.failed:
        log.warning("%s: case %s not preprocessed: %s", run.where, key, reason)
    ready = pre.processed + pre.cached
    if ready == 0:
        raise TaskFailed(
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
    log.info("%s: %d case(s) ready in %s; report %s", run.where, ready, pre.out_dir, report_path)
    data = {"preprocessed_dir": str(pre.out_dir), "ready_cases": ready, "report_file": str(report_path)}
    return str(write_json(run.out_dir / PREPARED_FILE, {**data, **stages}))
