"""Cohort selection from an OpenSearch index of DICOM metadata, as Kaapana keeps it.

Kaapana (``LocalDcm2JsonOperator`` / ``LocalJson2MetaOperator``) stores one document per series,
id = SeriesInstanceUID, in the project index (admin project: ``project_admin``; older releases:
``meta-index``). Field names are ``"<tag> <Keyword>_<type>"``, e.g.
``"0020000E SeriesInstanceUID_keyword"``; string fields carry a ``.keyword`` sub-field for exact
terms (Kaapana's own queries filter on ``"00080060 Modality_keyword.keyword"``). The data set is
matched on StudyDescription by default; ``dataset_field`` selects another field, e.g. Kaapana's
``"00000000 Tags_keyword"`` or the older ``"dataset_tags_keyword"``.

Unlike QIDO-RS these are exact ``term`` filters: case-sensitive, no wildcards. Kaapana's index does
not record a series' instance count, so the references carry ``n_instances=None`` and the fetch
cache asks the PACS.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from opensearchpy import OpenSearch
from opensearchpy.exceptions import OpenSearchException

from jipfed.cohort.model import CohortCase, SeriesRef, group_by_study
from jipfed.cohort.qido import DEFAULT_DATASET, DEFAULT_MODALITIES

log = logging.getLogger(__name__)

STUDY_UID_FIELD = "0020000D StudyInstanceUID_keyword"
SERIES_UID_FIELD = "0020000E SeriesInstanceUID_keyword"
MODALITY_FIELD = "00080060 Modality_keyword"
SERIES_DESCRIPTION_FIELD = "0008103E SeriesDescription_keyword"
STUDY_DESCRIPTION_FIELD = "00081030 StudyDescription_keyword"
DEFAULT_INDEX = "project_admin"
PAGE_SIZE = 1000


class OpenSearchCohortError(RuntimeError):
    """The metadata index could not be searched (the message names host, port and index)."""


def select_cohort(
    *,
    host: str,
    port: int,
    dataset: str = DEFAULT_DATASET,
    modalities: Sequence[str] = DEFAULT_MODALITIES,
    index: str = DEFAULT_INDEX,
    username: str | None = None,
    password: str | None = None,
    use_ssl: bool = False,
    verify_certs: bool = True,
    timeout_s: float = 30.0,
    dataset_field: str = STUDY_DESCRIPTION_FIELD,
    page_size: int = PAGE_SIZE,
) -> list[CohortCase]:
    """Cases of ``dataset`` with series of ``modalities``, like :func:`jipfed.cohort.qido.select_cohort`.

    Pages through the index with ``search_after`` sorted by SeriesInstanceUID (as Kaapana does).
    Raises ValueError for bad arguments, OpenSearchCohortError when the search fails.
    """
    if not dataset:
        raise ValueError("dataset must be non-empty")
    if isinstance(modalities, str) or not modalities or not all(isinstance(m, str) and m for m in modalities):
        raise ValueError(f"modalities must be a non-empty sequence of modality codes, got {modalities!r}")
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port!r}")
    if (username is None) != (password is None):
        raise ValueError("username and password must be given together")
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size!r}")
    client = OpenSearch(
        hosts=[{"host": host, "port": port}],
        http_auth=(username, password) if username is not None else None,
        use_ssl=use_ssl,
        verify_certs=verify_certs,
        timeout=timeout_s,
        max_retries=0,
    )
    where = f"OpenSearch at {'https' if use_ssl else 'http'}://{host}:{port}, index {index!r}"
    query = build_query(dataset, [m.upper() for m in modalities], dataset_field)
    refs: list[SeriesRef] = []
    search_after: list[Any] | None = None
    try:
        while True:
            body = {**query, "size": page_size, **({"search_after": search_after} if search_after else {})}
            hits = client.search(index=index, body=body)["hits"]["hits"]
            refs += [ref for hit in hits if (ref := _series_ref(hit, where)) is not None]
            if len(hits) < page_size:
                break
            search_after = hits[-1]["sort"]
    except OpenSearchException as exc:
        raise OpenSearchCohortError(f"{where}: search failed: {exc}") from exc
    except (KeyError, TypeError) as exc:
        raise OpenSearchCohortError(f"{where}: unexpected search response ({exc!r})") from exc
    finally:
        client.close()
    cases = group_by_study(refs, tuple(modalities))
    log.info("OpenSearch cohort %r from %s: %d cases, %d series", dataset, where, len(cases), len(refs))
    return cases


def build_query(
    dataset: str, modalities: Sequence[str], dataset_field: str = STUDY_DESCRIPTION_FIELD
) -> dict:
    """The search body (without size / search_after) for one data set and some modalities."""
    return {
        "query": {
            "bool": {
                "filter": [
                    {"term": {f"{dataset_field}.keyword": dataset}},
                    {"terms": {f"{MODALITY_FIELD}.keyword": list(modalities)}},
                ]
            }
        },
        "_source": {
            "includes": [STUDY_UID_FIELD, SERIES_UID_FIELD, MODALITY_FIELD, SERIES_DESCRIPTION_FIELD]
        },
        "sort": [{f"{SERIES_UID_FIELD}.keyword": "asc"}],
    }


def _first(value: Any) -> str:
    if isinstance(value, list):
        value = value[0] if value else ""
    return "" if value is None else str(value)


def _series_ref(hit: dict, where: str) -> SeriesRef | None:
    source = hit.get("_source") or {}
    try:
        return SeriesRef(
            study_uid=_first(source.get(STUDY_UID_FIELD)),
            series_uid=_first(source.get(SERIES_UID_FIELD)),
            modality=_first(source.get(MODALITY_FIELD)),
            description=_first(source.get(SERIES_DESCRIPTION_FIELD)),
            n_instances=None,
        )
    except ValueError as exc:
        log.warning("%s: skipping document %r: %s", where, hit.get("_id"), exc)
        return None
