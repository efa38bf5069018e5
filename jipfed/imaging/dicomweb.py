"""DICOMweb access to a PACS: STOW-RS upload, QIDO-RS series search, WADO-RS series fetch.

QIDO-RS works around an Orthanc pitfall (field-notes.md): Orthanc does not decode percent-encoded
query values, and dicomweb-client percent-encodes every value, so "BRATS SYNTH" or "T1*" silently
match nothing. :func:`query_series` therefore writes the query string itself: characters that are
safe in a URL query go through as they are (``*`` and ``?`` stay DICOM wildcards), every other
character (space, ``&``, ``+``, non-ASCII, ...) is sent as the single-character wildcard ``?`` and
the answers are then filtered against the exact value here. Matching is case-insensitive, as in
Orthanc.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO

from jipfed.cohort.model import SeriesRef, check_uid
from jipfed.imaging.dicom_io import InstanceUnreadable, read_instance, short_error
from jipfed.imaging.pacs import PacsConfig, PacsError

log = logging.getLogger(__name__)

#: Filters :func:`query_series` accepts (DICOM keyword -> tag as QIDO-RS returns it).
QUERY_TAGS = {
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "StudyDescription": "00081030",
    "SeriesDescription": "0008103E",
    "Modality": "00080060",
}
NUMBER_OF_SERIES_RELATED_INSTANCES = "00201209"
#: Characters sent unencoded in a query value; anything else becomes the wildcard "?".
_SAFE_QUERY_CHARS = re.compile(r"[A-Za-z0-9\-._~!$'()*,;:@/^?]")
QUERY_PAGE_SIZE = 1000
UPLOAD_BATCH_SIZE = 50
UPLOAD_BATCH_BYTES = 64 * 1024 * 1024
#: Attributes an instance needs to be stored (a file without them is damaged; not sent).
_STOW_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
#: WADO-RS media type asking for every instance as stored (no transcoding by the PACS).
AS_STORED = (("application/dicom", "*"),)
#: STOW-RS answers that blame the request's content (an instance), not the PACS or our credentials.
_INSTANCE_ERROR_STATUSES = (400, 409, 415, 422)


@dataclass(frozen=True)
class UploadReport:
    """What :func:`upload_folder` did.

    Attributes:
        files: DICOM files found.
        stored: Instances the PACS acknowledged (re-sending a stored instance counts as stored).
        failed: ``(SOPInstanceUID, reason)`` for instances the PACS refused or did not acknowledge.
        skipped: Paths of files that are not DICOM (no ``DICM`` marker); not sent.
        unreadable: ``(path, reason)`` of DICOM files that cannot be read (damaged, truncated, no
            SOP/study/series UIDs) or encoded again; not sent, the others are.
    """

    files: int
    stored: int
    failed: tuple[tuple[str, str], ...] = ()
    skipped: tuple[str, ...] = ()
    unreadable: tuple[tuple[str, str], ...] = ()

    @property
    def ok(self) -> bool:
        return not self.failed and not self.unreadable and self.stored == self.files


# -- shared plumbing ------------------------------------------------------------------------------
def make_session(config: PacsConfig) -> requests.Session:
    """A requests session carrying the config's credentials."""
    session = requests.Session()
    session.auth = config.auth
    return session


def make_client(config: PacsConfig, session: requests.Session | None = None) -> DICOMwebClient:
    """A dicomweb-client for the config's DICOMweb root, with its credentials and timeout.

    Its built-in retries are off (they also retry a refused connection, with back-off: ~30 s per
    call against a PACS that is down); retrying is the caller's job (e.g. Airflow task retries).
    """
    client = DICOMwebClient(
        config.dicomweb_url, session=session or make_session(config), timeout=config.timeout_s
    )
    client.set_http_retry_params(retry=False)
    return client


def pacs_error(config: PacsConfig, action: str, exc: BaseException) -> PacsError:
    """A :class:`PacsError` naming the PACS URL and what failed."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        hint = " (authentication failed: check username/password)" if status in (401, 403) else ""
        return PacsError(f"PACS at {config.dicomweb_url}: {action} failed with HTTP {status}{hint}")
    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        return PacsError(f"PACS at {config.dicomweb_url} is unreachable ({action}): {exc}")
    return PacsError(f"PACS at {config.dicomweb_url}: {action} failed: {exc}")


# -- STOW-RS ------------------------------------------------------------------------------------
def upload_folder(
    config: PacsConfig,
    folder: str | Path,
    *,
    batch_size: int = UPLOAD_BATCH_SIZE,
    batch_bytes: int = UPLOAD_BATCH_BYTES,
) -> UploadReport:
    """Upload every DICOM file below ``folder`` (recursively) over STOW-RS.

    Instances are sent in batches of at most ``batch_size`` files / about ``batch_bytes`` bytes.
    Raises PacsError if the PACS cannot be reached or answers an HTTP error (batches sent before
    stay stored; uploading again is harmless).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"not a folder: {root}")
    return upload_files(
        config,
        sorted(p for p in root.rglob("*") if p.is_file()),
        batch_size=batch_size,
        batch_bytes=batch_bytes,
    )


def upload_files(
    config: PacsConfig,
    paths: Iterable[str | Path],
    *,
    batch_size: int = UPLOAD_BATCH_SIZE,
    batch_bytes: int = UPLOAD_BATCH_BYTES,
) -> UploadReport:
    """Upload the given files over STOW-RS; non-DICOM files are skipped (see :func:`upload_folder`)."""
    if batch_size < 1 or batch_bytes < 1:
        raise ValueError(f"batch_size and batch_bytes must be >= 1, got {batch_size}, {batch_bytes}")
    skipped: list[str] = []
    unreadable: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    files = stored = 0
    with make_session(config) as session:
        client = make_client(config, session)
        for batch in _batches(paths, batch_size, batch_bytes, skipped, unreadable):
            files += len(batch)
            batch_stored, batch_failed = _store_batch(config, client, batch)
            stored += batch_stored
            failed += batch_failed
    report = UploadReport(
        files=files, stored=stored, failed=tuple(failed), skipped=tuple(skipped), unreadable=tuple(unreadable)
    )
    log.info(
        "STOW-RS to %s: %d of %d instances stored, %d failed, %d unreadable, %d non-DICOM files skipped",
        config.dicomweb_url,
        report.stored,
        report.files,
        len(report.failed),
        len(report.unreadable),
        len(report.skipped),
    )
    return report


def _batches(
    paths: Iterable[str | Path],
    batch_size: int,
    batch_bytes: int,
    skipped: list[str],
    unreadable: list[tuple[str, str]],
) -> Iterator[list[Dataset]]:
    batch: list[Dataset] = []
    size = 0
    for path in paths:
        if not has_dicom_marker(Path(path)):
            skipped.append(str(path))
            continue
        try:
            ds = read_instance(Path(path), required=_STOW_REQUIRED)
            _encodable(ds, Path(path))
        except InstanceUnreadable as exc:
            log.warning("not uploading %s: %s", path, exc.reason)
            unreadable.append((str(path), exc.reason))
            continue
        file_size = Path(path).stat().st_size
        if batch and (len(batch) >= batch_size or size + file_size > batch_bytes):
            yield batch
            batch, size = [], 0
        batch.append(ds)
        size += file_size
    if batch:
        yield batch


def has_dicom_marker(path: Path) -> bool:
    """Whether the file has the DICOM Part 10 marker ``DICM`` after its 128-byte preamble."""
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _encodable(ds: Dataset, path: Path) -> None:
    """Raise :class:`InstanceUnreadable` unless pydicom can encode ``ds`` again (as STOW-RS does)."""
    try:
        ds.save_as(DicomBytesIO(), enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 - any encoder failure is a property of the file
        raise InstanceUnreadable(path, f"cannot be encoded again ({short_error(exc)})") from exc


def _store_batch(
    config: PacsConfig, client: DICOMwebClient, batch: Sequence[Dataset]
) -> tuple[int, list[tuple[str, str]]]:
    """Store one batch; if the PACS rejects the whole request as bad (Orthanc: HTTP 400 for one
    instance missing a mandatory tag), store its instances one by one to find the culprits."""
    try:
        response = client.store_instances(batch)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status not in _INSTANCE_ERROR_STATUSES:
            raise pacs_error(config, f"STOW-RS of {len(batch)} instances", exc) from exc
        if len(batch) == 1:
            return 0, [(str(batch[0].SOPInstanceUID), f"rejected with HTTP {status}")]
        log.warning(
            "STOW-RS batch rejected with HTTP %s; storing its %d instances one by one", status, len(batch)
        )
        outcomes = [_store_batch(config, client, [ds]) for ds in batch]
        return sum(n for n, _ in outcomes), [item for _, items in outcomes for item in items]
    except (requests.RequestException, ValueError) as exc:
        raise pacs_error(config, f"STOW-RS of {len(batch)} instances", exc) from exc
    return _stow_outcome(batch, response)


def _stow_outcome(batch: Sequence[Dataset], response: Dataset) -> tuple[int, list[tuple[str, str]]]:
    """(acknowledged count, failures) of one STOW-RS answer; its FailedSOPSequence is always present."""
    failed = {
        str(
            item.get("ReferencedSOPInstanceUID", "")
        ): f"failure reason {item.get('FailureReason', 'unknown')}"
        for item in response.get("FailedSOPSequence", [])
    }
    acknowledged = {
        str(item.get("ReferencedSOPInstanceUID", "")) for item in response.get("ReferencedSOPSequence", [])
    }
    sent = [str(ds.SOPInstanceUID) for ds in batch]
    for uid in sent:
        if uid not in failed and uid not in acknowledged:
            failed[uid] = "not acknowledged by the PACS"
    return sum(uid in acknowledged and uid not in failed for uid in sent), sorted(failed.items())


# -- QIDO-RS ------------------------------------------------------------------------------------
def query_series(config: PacsConfig, **filters: str) -> list[SeriesRef]:
    """Series matching all ``filters`` (QIDO-RS at series level), sorted by study and series UID.

    Keywords: StudyInstanceUID, SeriesInstanceUID, StudyDescription, SeriesDescription, Modality.
    Values may use the DICOM wildcards ``*`` and ``?``; matching is case-insensitive. Raises
    ValueError for an unknown keyword, PacsError when the PACS fails.
    """
    unknown = set(filters) - set(QUERY_TAGS)
    if unknown:
        raise ValueError(f"unsupported QIDO filter(s) {sorted(unknown)}; use {sorted(QUERY_TAGS)}")
    for key in ("StudyInstanceUID", "SeriesInstanceUID"):
        if key in filters:
            check_uid(filters[key], key)
    query = "&".join(f"{key}={quote_qido_value(value)}" for key, value in sorted(filters.items()))
    include = "&".join(
        f"includefield={tag}" for tag in (*QUERY_TAGS.values(), NUMBER_OF_SERIES_RELATED_INSTANCES)
    )
    matchers = {QUERY_TAGS[key]: _wildcard_regex(value) for key, value in filters.items()}
    found: dict[str, SeriesRef] = {}
    with make_session(config) as session:
        offset = 0
        while True:
            url = f"{config.dicomweb_url}/series?{query}{'&' if query else ''}{include}"
            url += f"&limit={QUERY_PAGE_SIZE}&offset={offset}"
            page = _get_json(config, session, url)
            for item in page:
                if all(matcher.fullmatch(_value(item, tag)) for tag, matcher in matchers.items()):
                    ref = _series_ref(item)
                    found[ref.series_uid] = ref
            # a server that ignores limit answers everything at once: stop there too
            if len(page) != QUERY_PAGE_SIZE:
                break
            offset += QUERY_PAGE_SIZE
    refs = sorted(found.values(), key=lambda r: (r.study_uid, r.series_uid))
    log.debug("QIDO-RS %s %s -> %d series", config.dicomweb_url, filters, len(refs))
    return refs


def series_copies(config: PacsConfig, series_uid: str) -> int:
    """How many series entries the PACS holds under this SeriesInstanceUID: more than one when the
    series is split across patients or studies (Orthanc files it once per patient and study)."""
    check_uid(series_uid, "SeriesInstanceUID")
    with make_session(config) as session:
        url = f"{config.dicomweb_url}/series?SeriesInstanceUID={series_uid}&includefield={QUERY_TAGS['StudyInstanceUID']}"
        return len(_get_json(config, session, url))


def quote_qido_value(value: str) -> str:
    """A query value Orthanc reads as meant: safe characters as they are, all others as ``?``."""
    if not value:
        raise ValueError("empty QIDO filter value (it would match everything)")
    return "".join(ch if _SAFE_QUERY_CHARS.fullmatch(ch) else "?" for ch in value)


def _wildcard_regex(pattern: str) -> re.Pattern[str]:
    """DICOM wildcard matching (``*`` any run, ``?`` one character), case-insensitive."""
    parts = (".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.compile("".join(parts), re.IGNORECASE | re.DOTALL)


def _get_json(config: PacsConfig, session: requests.Session, url: str) -> list[dict]:
    try:
        response = session.get(url, headers={"Accept": "application/dicom+json"}, timeout=config.timeout_s)
        response.raise_for_status()
    except requests.RequestException as exc:
        raise pacs_error(config, f"QIDO-RS {urlsplit(url).path}", exc) from exc
    if response.status_code == 204 or not response.content:
        return []
    try:
        body = response.json()
    except ValueError as exc:
        raise pacs_error(config, "QIDO-RS (answer is not JSON)", exc) from exc
    if not isinstance(body, list):
        raise PacsError(f"PACS at {config.dicomweb_url}: QIDO-RS answer is not a JSON list")
    return body


def _value(item: dict, tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0]).rstrip(" ")


def _series_ref(item: dict) -> SeriesRef:
    count = _value(item, NUMBER_OF_SERIES_RELATED_INSTANCES)
    return SeriesRef(
        study_uid=_value(item, QUERY_TAGS["StudyInstanceUID"]),
        series_uid=_value(item, QUERY_TAGS["SeriesInstanceUID"]),
        modality=_value(item, QUERY_TAGS["Modality"]),
        description=_value(item, QUERY_TAGS["SeriesDescription"]),
        n_instances=int(count) if count else None,
    )


# -- WADO-RS ------------------------------------------------------------------------------------
def fetch_series_wado(config: PacsConfig, ref: SeriesRef, dest_dir: str | Path) -> int:
    """Fetch every instance of ``ref`` over WADO-RS into ``dest_dir`` as ``<SOPInstanceUID>.dcm``,
    in the transfer syntax the PACS stored it in (``transfer-syntax=*``: a PACS that cannot
    transcode JPEG 2000 would fail the default Explicit VR Little Endian request).

    Returns the number of instances written. Raises PacsError when the PACS fails (files already
    written stay; the fetch cache writes into a temp folder and discards it).
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    action = f"WADO-RS of series {ref.series_uid}"
    with make_session(config) as session:
        client = make_client(config, session)
        try:
            for ds in client.iter_series(ref.study_uid, ref.series_uid, media_types=AS_STORED):
                uid = check_uid(str(ds.SOPInstanceUID), "SOPInstanceUID")
                ds.save_as(dest / f"{uid}.dcm", enforce_file_format=True)
                count += 1
        except requests.HTTPError as exc:
            if exc.response is not None and exc.response.status_code == 404:
                raise PacsError(
                    f"PACS at {config.dicomweb_url}: {action} answered HTTP 404; the series is not "
                    "under its study there (deleted, or split across patients or studies in the PACS?)"
                ) from exc
            raise pacs_error(config, action, exc) from exc
        except requests.RequestException as exc:
            raise pacs_error(config, action, exc) from exc
        except Exception as exc:  # noqa: BLE001 - a damaged instance in the answer: this series fails
            raise PacsError(
                f"PACS at {config.dicomweb_url}: {action}: instance {count + 1} cannot be read "
                f"({short_error(exc)})"
            ) from exc
    log.debug("WADO-RS %s: %d instances of series %s", config.dicomweb_url, count, ref.series_uid)
    return count
