"""Cohort selection over QIDO-RS: the series of one data set (StudyDescription) grouped into cases."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from jipfed.cohort.model import CohortCase, group_by_study
from jipfed.imaging.dicomweb import query_series
from jipfed.imaging.pacs import PacsConfig

log = logging.getLogger(__name__)

DEFAULT_DATASET = "BRATS-SYNTH"
DEFAULT_MODALITIES = ("MR", "SEG")


def select_cohort(
    config: PacsConfig, dataset: str = DEFAULT_DATASET, modalities: Sequence[str] = DEFAULT_MODALITIES
) -> list[CohortCase]:
    """Cases whose StudyDescription is ``dataset`` (case-insensitive, spaces allowed), with the
    series of the given modalities; sorted by StudyInstanceUID. One QIDO-RS search (paged).

    Raises ValueError for an empty dataset or modality list, PacsError when the PACS fails.
    """
    if not dataset or not dataset.strip():
        raise ValueError("dataset must be a non-empty StudyDescription value")
    if isinstance(modalities, str) or not modalities or not all(isinstance(m, str) and m for m in modalities):
        raise ValueError(f"modalities must be a non-empty sequence of modality codes, got {modalities!r}")
    cases = group_by_study(query_series(config, StudyDescription=dataset), tuple(modalities))
    log.info(
        "QIDO cohort %r from %s: %d cases, %d series",
        dataset,
        config.dicomweb_url,
        len(cases),
        sum(len(c.series) for c in cases),
    )
    return cases
