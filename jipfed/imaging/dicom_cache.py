"""The site's local fetch cache: ``<data_root>/dicom/<StudyInstanceUID>/<SeriesInstanceUID>/*.dcm``.

A series folder appears only complete: it is fetched into a hidden temp folder beside it
(``.<SeriesInstanceUID>.partial-*``), checked against the expected instance count, given a
``.complete.json`` marker (written last) and then renamed into place with ``os.rename``. So an
interrupted fetch never looks cached; its leftovers are removed the next time that series is
fetched. The marker records the count and a content hash: sha256 over the sorted per-file sha256
hex digests (one per line), which is independent of file names and order.

Nothing under ``data_root`` ever leaves the site.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from jipfed.cohort.model import SeriesRef
from jipfed.imaging.dicomweb import fetch_series_wado, query_series, series_copies
from jipfed.imaging.dimse import fetch_series_cget
from jipfed.imaging.pacs import PacsConfig, PacsError

log = logging.getLogger(__name__)

MARKER = ".complete.json"
#: Transport name -> function fetching one series into a folder and returning the instance count.
TRANSPORTS: dict[str, Callable[[PacsConfig, SeriesRef, Path], int]] = {
    "dicomweb": fetch_series_wado,
    "cget": fetch_series_cget,
}
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class FetchReport:
    """Outcome of :meth:`DicomCache.fetch`: series fetched now, already cached, and failed."""

    fetched: int
    cached: int
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_content_hash(files: Iterable[Path]) -> str:
    """sha256 of the sorted sha256 hex digests of ``files``, one per line."""
    digests = sorted(file_sha256(path) for path in files)
    return hashlib.sha256("\n".join(digests).encode("ascii")).hexdigest()


class DicomCache:
    """Fetch cache below ``root`` (a site's ``data_root``); series live in ``root/dicom``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.dicom_root = self.root / "dicom"

    def series_dir(self, ref: SeriesRef) -> Path:
        """Where the series lives once complete (UIDs are validated, so the path stays below root)."""
        return self.dicom_root / ref.study_uid / ref.series_uid

    def marker(self, ref: SeriesRef) -> dict | None:
        """The parsed ``.complete.json`` of a cached series, or None if the series is not complete."""
        try:
            data = json.loads((self.series_dir(ref) / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def is_cached(self, ref: SeriesRef) -> bool:
        """True if the series folder is complete (marker present, instance counts agree)."""
        data = self.marker(ref)
        if data is None or not isinstance(data.get("count"), int):
            return False
        if ref.n_instances is not None and data["count"] != ref.n_instances:
            return False
        return len(self.instance_files(ref)) == data["count"]

    def instance_files(self, ref: SeriesRef) -> list[Path]:
        """The ``*.dcm`` files of the series folder, sorted ([] if absent)."""
        return sorted(self.series_dir(ref).glob("*.dcm"))

    def content_hash(self, ref: SeriesRef) -> str:
        """The content hash recorded when the series was fetched; LookupError if not cached."""
        if not self.is_cached(ref):
            raise LookupError(f"series {ref.series_uid} is not in the cache at {self.dicom_root}")
        data = self.marker(ref) or {}
        return str(data["content_hash"])

    def fetch(
        self, config: PacsConfig, refs: Iterable[SeriesRef], transport: str = "dicomweb"
    ) -> FetchReport:
        """Fetch the series of ``refs`` that are not complete yet, over ``transport`` (dicomweb | cget).

        A series whose fetched instance count differs from ``n_instances`` (asked over QIDO-RS when
        None) fails and is not marked complete; failures do not stop the other series.
        """
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}; use one of {sorted(TRANSPORTS)}")
        if transport == "cget" and config.dimse_port is None:
            raise ValueError("transport 'cget' needs a PacsConfig with dimse_port")
        fetch_one = TRANSPORTS[transport]
        fetched = cached = 0
        failed: list[tuple[str, str]] = []
        for ref in dict.fromkeys(refs):
            if self.is_cached(ref):
                cached += 1
                continue
            try:
                self._fetch_series(config, ref, fetch_one, transport)
            except (PacsError, OSError, ValueError) as exc:
                log.warning("fetch of series %s failed: %s", ref.series_uid, exc)
                failed.append((ref.series_uid, str(exc)))
            else:
                fetched += 1
        report = FetchReport(fetched=fetched, cached=cached, failed=failed)
        log.info(
            "fetch via %s from %s: %d fetched, %d cached, %d failed",
            transport,
            config.dicomweb_url,
            report.fetched,
            report.cached,
            len(report.failed),
        )
        return report

    def _fetch_series(
        self,
        config: PacsConfig,
        ref: SeriesRef,
        fetch_one: Callable[[PacsConfig, SeriesRef, Path], int],
        transport: str,
    ) -> None:
        expected = ref.n_instances if ref.n_instances is not None else _count_in_pacs(config, ref)
        final = self.series_dir(ref)
        final.parent.mkdir(parents=True, exist_ok=True)
        for leftover in final.parent.glob(f".{ref.series_uid}.partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{ref.series_uid}.partial-", dir=final.parent))
        try:
            try:
                count = fetch_one(config, ref, temp)
                files = sorted(temp.glob("*.dcm"))
                if count != expected or len(files) != expected:
                    raise PacsError(
                        f"series {ref.series_uid}: fetched {count} instances ({len(files)} files), expected {expected}"
                    )
            except PacsError as exc:
                raise _explain_split(config, ref, exc) from exc
            marker = {
                "study_uid": ref.study_uid,
                "series_uid": ref.series_uid,
                "modality": ref.modality,
                "description": ref.description,
                "count": expected,
                "content_hash": folder_content_hash(files),
                "transport": transport,
                "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            (temp / MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
            if final.exists():  # an incomplete folder put there by something else: replace it
                shutil.rmtree(final)
            os.rename(temp, final)
        finally:
            if temp.exists():
                shutil.rmtree(temp, ignore_errors=True)


def _explain_split(config: PacsConfig, ref: SeriesRef, error: PacsError) -> PacsError:
    """The fetch error, or a clearer one when the PACS files the series under several patients or
    studies (WADO-RS then answers 404, C-GET returns more instances than QIDO-RS counted)."""
    try:
        copies = series_copies(config, ref.series_uid)
    except PacsError:
        return error
    if copies < 2:
        return error
    log.warning("fetch of series %s failed: %s", ref.series_uid, error)
    return PacsError(
        f'series "{ref.description}" is split across {copies} patients or studies in the PACS '
        "(PatientID or StudyInstanceUID differs between its instances): fix it there"
    )


def _count_in_pacs(config: PacsConfig, ref: SeriesRef) -> int:
    """Instance count of a series whose reference does not carry one, asked over QIDO-RS."""
    matches = query_series(config, StudyInstanceUID=ref.study_uid, SeriesInstanceUID=ref.series_uid)
    if not matches:
        raise PacsError(f"PACS at {config.dicomweb_url}: series {ref.series_uid} not found")
    count = matches[0].n_instances
    if count is None:
        raise PacsError(f"PACS at {config.dicomweb_url}: no instance count for series {ref.series_uid}")
    return count
