"""The cohort vocabulary: a series reference and a case (one study with its selected series)."""

from __future__ import annotations

import re
from dataclasses import dataclass

#: A DICOM UID: dot-separated numeric components, at most 64 characters (leading zeros, which
#: legacy data sometimes has, are tolerated).
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def check_uid(value: str, what: str) -> str:
    """Return ``value`` if it is a valid DICOM UID, else raise ValueError naming ``what``.

    UIDs become folder and file names in the fetch cache, so this also keeps paths safe.
    """
    if not isinstance(value, str) or len(value) > 64 or not UID_RE.match(value):
        raise ValueError(f"{what} is not a valid DICOM UID: {value!r}")
    return value


@dataclass(frozen=True)
class SeriesRef:
    """One series in the PACS.

    Args:
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
        modality: Modality, e.g. ``MR`` or ``SEG``.
        description: SeriesDescription ("" when absent).
        n_instances: Number of instances; None = unknown (an index that does not record it, such as
            Kaapana's OpenSearch metadata). The fetch cache then asks the PACS over QIDO-RS.
    """

    study_uid: str
    series_uid: str
    modality: str
    description: str
    n_instances: int | None

    def __post_init__(self) -> None:
        check_uid(self.study_uid, "study_uid")
        check_uid(self.series_uid, "series_uid")
        if self.n_instances is not None and (
            isinstance(self.n_instances, bool)
            or not isinstance(self.n_instances, int)
            or self.n_instances < 0
        ):
            raise ValueError(f"n_instances must be None or an int >= 0, got {self.n_instances!r}")


@dataclass(frozen=True)
class CohortCase:
    """One case of a cohort: a study and its selected series (all of that study)."""

    study_uid: str
    series: tuple[SeriesRef, ...]

    def __post_init__(self) -> None:
        check_uid(self.study_uid, "study_uid")
        if not isinstance(self.series, tuple):
            raise ValueError("series must be a tuple of SeriesRef")
        for ref in self.series:
            if ref.study_uid != self.study_uid:
                raise ValueError(
                    f"series {ref.series_uid} belongs to study {ref.study_uid}, not {self.study_uid}"
                )


def group_by_study(refs: list[SeriesRef], modalities: tuple[str, ...]) -> list[CohortCase]:
    """Keep the series whose modality is in ``modalities`` and group them into cases.

    Cases are sorted by StudyInstanceUID, series within a case by (modality, description, UID).
    Modality matching is case-insensitive; studies left without series are dropped.
    """
    wanted = {m.upper() for m in modalities}
    by_study: dict[str, dict[str, SeriesRef]] = {}
    for ref in refs:
        if ref.modality.upper() in wanted:
            by_study.setdefault(ref.study_uid, {})[ref.series_uid] = ref
    return [
        CohortCase(
            study_uid=study,
            series=tuple(sorted(series.values(), key=lambda r: (r.modality, r.description, r.series_uid))),
        )
        for study, series in sorted(by_study.items())
    ]
