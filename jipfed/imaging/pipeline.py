"""A site's data preparation: cohort → fetch → convert → preprocess, each stage cached.

Stages are small functions over a :class:`SiteDataConfig`, so an Airflow operator can run them
one by one; :func:`prepare_site` chains them and returns a :class:`PrepareReport` with the
counters of every stage. On disk (``docs/architecture.md``)::

    <data_root>/dicom/<StudyInstanceUID>/<SeriesInstanceUID>/*.dcm    fetch cache
    <data_root>/nifti/<case_key>/{image,label}.nii.gz, case.json       converted cases
    <data_root>/preprocessed/<config_hash>/<case_key>.npz, index.json  preprocessed cases
    <data_root>/reports/prepare-<UTC timestamp>.json                   the run's report

A second run with nothing new in the PACS fetches, converts and preprocesses nothing. The
report holds counts, case keys and reasons; its ``fetch_failed`` entries name series UIDs, so
like everything under ``data_root`` it stays on site.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jipfed.cohort.model import CohortCase, SeriesRef
from jipfed.cohort.qido import DEFAULT_DATASET, select_cohort
from jipfed.imaging.convert import ConversionReport, case_key_for, convert_cases
from jipfed.imaging.dicom_cache import TRANSPORTS as FETCHERS
from jipfed.imaging.dicom_cache import DicomCache, FetchReport
from jipfed.imaging.pacs import PacsConfig
from jipfed.imaging.preprocess import PreprocessConfig, PreprocessReport, preprocess_cases

logger = logging.getLogger(__name__)

#: Fetch transports: "dicomweb" (WADO-RS) and "cget" (DIMSE C-GET).
TRANSPORTS: tuple[str, ...] = tuple(FETCHERS)
REPORTS_DIR = "reports"


@dataclass(frozen=True)
class SiteDataConfig:
    """Everything one site's data preparation needs.

    Args:
        site_id: the site's id (for logs and reports only).
        pacs: how to reach the site's PACS.
        data_root: the site's local data folder (never leaves the site).
        dataset: cohort selector, the StudyDescription of the studies to use.
        transport: ``"dicomweb"`` (WADO-RS) or ``"cget"`` (DIMSE C-GET) for fetching.
        preprocess: the MONAI preprocessing; its hash names the preprocessed folder.
    """

    site_id: str
    pacs: PacsConfig
    data_root: Path
    dataset: str = DEFAULT_DATASET
    transport: str = "dicomweb"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.site_id, str) or not self.site_id.strip():
            raise ValueError(f"site_id must be a non-empty string, got {self.site_id!r}")
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise ValueError(f"dataset must be a non-empty string, got {self.dataset!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.transport == "cget" and self.pacs.dimse_port is None:
            raise ValueError("transport 'cget' needs a PacsConfig with dimse_port")
        object.__setattr__(self, "data_root", Path(self.data_root))

    @property
    def nifti_root(self) -> Path:
        return self.data_root / "nifti"

    @property
    def preprocessed_root(self) -> Path:
        return self.data_root / "preprocessed"


@dataclass(frozen=True)
class PrepareReport:
    """Counters of one :func:`prepare_site` run; ``to_dict()`` is JSON-serialisable.

    Series counts for the fetch stage, case counts for the others. ``*_skipped`` / ``*_failed``
    hold (case_key or series UID, reason). ``seconds`` holds wall time per stage and in total.
    """

    site_id: str
    transport: str
    cohort_cases: int
    cohort_series: int
    fetched: int
    fetch_cached: int
    fetch_failed: list[tuple[str, str]]
    converted: int
    convert_cached: int
    convert_skipped: list[tuple[str, str]]
    preprocessed: int
    preprocess_cached: int
    preprocess_failed: list[tuple[str, str]]
    ready_cases: int
    preprocessed_dir: str
    seconds: dict[str, float]
    #: (case_key, reason) for objects left out of a series (stray SR, presentation state, ...).
    convert_left_out: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("fetch_failed", "convert_skipped", "preprocess_failed", "convert_left_out"):
            data[key] = [list(item) for item in data[key]]
        return data


# -- stages ---------------------------------------------------------------------------------------
def select_cases(cfg: SiteDataConfig) -> list[CohortCase]:
    """The cohort: studies of ``cfg.dataset`` in the PACS with their series (QIDO-RS)."""
    cases = select_cohort(cfg.pacs, dataset=cfg.dataset)
    logger.info(
        "site %s: cohort %r has %d case(s), %d series",
        cfg.site_id,
        cfg.dataset,
        len(cases),
        sum(len(c.series) for c in cases),
    )
    return cases


def fetch_cases(cfg: SiteDataConfig, cases: Sequence[CohortCase]) -> tuple[FetchReport, list[CohortCase]]:
    """Fetch the series not yet in the fetch cache; returns the FetchReport and the complete cases.

    A case is complete when every one of its series is in the cache (fetched now or before).
    """
    cache = DicomCache(cfg.data_root)
    report = cache.fetch(cfg.pacs, [ref for case in cases for ref in case.series], cfg.transport)
    complete = [case for case in cases if all(cache.is_cached(ref) for ref in case.series)]
    return report, complete


def incomplete_reasons(
    cases: Sequence[CohortCase], complete: Sequence[CohortCase], fetch: FetchReport
) -> list[tuple[str, str]]:
    """(case_key, reason) for each case not fully fetched: the first failed series' description
    and its fetch error, so the report says why (not only "not all series fetched")."""
    done = {case.study_uid for case in complete}
    failed = dict(fetch.failed)
    reasons = []
    for case in sorted(cases, key=lambda c: c.study_uid):
        if case.study_uid in done:
            continue
        why = next((_named(ref, failed[ref.series_uid]) for ref in case.series if ref.series_uid in failed), None)
        why = why or "not in the fetch cache"
        reasons.append((case_key_for(case.study_uid), f"not all series fetched: {why}"))
    return reasons


def _named(ref: SeriesRef, reason: str) -> str:
    """The reason, led by the series description unless it names the series already."""
    name = f'series "{ref.description}"'
    return reason if reason.startswith(name) else f"{name}: {reason}"


def convert_fetched(cfg: SiteDataConfig, cases: Sequence[CohortCase]) -> ConversionReport:
    """Convert the cases' fetched study folders to NIfTI under ``cfg.nifti_root`` (cached by content hash).

    The converter skips the fetch cache's hidden entries (``.complete.json`` markers, partial fetches).
    """
    cache = DicomCache(cfg.data_root)
    study_dirs = {cache.series_dir(case.series[0]).parent for case in cases if case.series}
    return convert_cases(sorted(study_dirs), cfg.nifti_root)


def preprocess_converted(
    cfg: SiteDataConfig, case_keys: Sequence[str], progress: bool = True
) -> PreprocessReport:
    """Preprocess converted cases into ``<preprocessed_root>/<config_hash>/`` (cached)."""
    return preprocess_cases(
        [cfg.nifti_root / key for key in case_keys], cfg.preprocessed_root, cfg.preprocess, progress=progress
    )


# -- the whole pipeline ---------------------------------------------------------------------------
def prepare_site(cfg: SiteDataConfig, progress: bool = True) -> PrepareReport:
    """Run every stage, log the report and write it to ``<data_root>/reports/``.

    Raises PacsError when the PACS cannot be queried; per-series and per-case failures are
    reported, not raised.
    """
    seconds: dict[str, float] = {}
    start = last = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal last
        now = time.perf_counter()
        seconds[stage] = round(now - last, 3)
        last = now

    cases = select_cases(cfg)
    lap("cohort")
    fetch, complete = fetch_cases(cfg, cases)
    lap("fetch")
    conversion = convert_fetched(cfg, complete)
    lap("convert")
    keys = sorted([*conversion.converted, *conversion.cached])
    pre = preprocess_converted(cfg, keys, progress=progress)
    lap("preprocess")
    seconds["total"] = round(time.perf_counter() - start, 3)

    report = PrepareReport(
        site_id=cfg.site_id,
        transport=cfg.transport,
        cohort_cases=len(cases),
        cohort_series=sum(len(c.series) for c in cases),
        fetched=fetch.fetched,
        fetch_cached=fetch.cached,
        fetch_failed=[tuple(item) for item in fetch.failed],
        converted=len(conversion.converted),
        convert_cached=len(conversion.cached),
        convert_skipped=[(key, reason) for key, _folder, reason in conversion.skipped]
        + incomplete_reasons(cases, complete, fetch),
        preprocessed=pre.processed,
        preprocess_cached=pre.cached,
        preprocess_failed=list(pre.failed),
        ready_cases=pre.processed + pre.cached,
        preprocessed_dir=str(pre.out_dir),
        seconds=seconds,
    )
    path = write_report(cfg, report)
    logger.info("site %s prepared (%s): %s", cfg.site_id, path, json.dumps(report.to_dict()))
    return report


def write_report(cfg: SiteDataConfig, report: PrepareReport) -> Path:
    """Write the report to ``<data_root>/reports/prepare-<UTC timestamp>.json`` (atomically)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = cfg.data_root / REPORTS_DIR / f"prepare-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report.to_dict(), indent=2))
    os.replace(tmp, path)
    return path
