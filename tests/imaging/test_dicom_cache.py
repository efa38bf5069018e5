"""DicomCache against a real Orthanc: layout, completeness marker, content hash, cached re-fetch,
count mismatches, interrupted fetches (failing transport, Ctrl-C, PACS crashing mid-way), PACS down.

Fails (not skips) when Orthanc is missing.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from jipfed.cohort.model import SeriesRef
from jipfed.imaging import dicom_cache
from jipfed.imaging.dicom_cache import MARKER, DicomCache, folder_content_hash
from jipfed.imaging.dicomweb import fetch_series_wado, upload_files
from jipfed.imaging.pacs import PacsConfig, PacsError
from jipfed.testing.dicom_samples import SampleSeries, synth_dataset
from jipfed.testing.orthanc import OrthancServer


@pytest.fixture(scope="module")
def samples() -> list[SampleSeries]:
    """A two-case ``jipfed synth`` data set: 4 MR series and a SEG per case."""
    return list(synth_dataset("BRATS SYNTH"))


@pytest.fixture(scope="module")
def pacs(samples: list[SampleSeries]) -> Iterator[OrthancServer]:
    with OrthancServer() as server:
        assert upload_files(server.pacs_config, [f for s in samples for f in s.files]).ok
        yield server


@pytest.fixture(scope="module")
def refs(samples: list[SampleSeries]) -> list[SeriesRef]:
    return [SeriesRef(s.study_uid, s.series_uid, s.modality, s.description, len(s.files)) for s in samples]


def _leftovers(cache: DicomCache) -> list[Path]:
    return sorted(cache.dicom_root.glob("*/.*.partial-*"))


@pytest.mark.parametrize("transport", ["dicomweb", "cget"])
def test_fetch_then_cached(
    pacs: OrthancServer, samples: list[SampleSeries], refs: list[SeriesRef], transport: str, tmp_path: Path
) -> None:
    if transport == "cget":  # one case only: Orthanc's C-GET takes ~60 ms per instance here
        keep = [i for i, s in enumerate(samples) if s.study_uid == samples[0].study_uid]
        samples, refs = [samples[i] for i in keep], [refs[i] for i in keep]
    cache = DicomCache(tmp_path)
    report = cache.fetch(pacs.pacs_config, refs, transport=transport)
    assert (report.fetched, report.cached, report.failed) == (len(refs), 0, [])
    for sample, ref in zip(samples, refs, strict=True):
        folder = tmp_path / "dicom" / ref.study_uid / ref.series_uid
        assert cache.series_dir(ref) == folder
        assert cache.is_cached(ref)
        assert len(cache.instance_files(ref)) == len(sample.files)
        marker = json.loads((folder / MARKER).read_text())
        assert (marker["count"], marker["transport"]) == (len(sample.files), transport)
        assert (
            cache.content_hash(ref)
            == marker["content_hash"]
            == folder_content_hash(cache.instance_files(ref))
        )
        if transport == "dicomweb":  # WADO-RS returns the stored files unchanged
            assert cache.content_hash(ref) == folder_content_hash(sample.files)
    again = cache.fetch(pacs.pacs_config, [*refs, refs[0]], transport=transport)
    assert (again.fetched, again.cached, again.failed) == (0, len(refs), [])
    assert _leftovers(cache) == []


def test_count_mismatch_is_failed_and_not_complete(
    pacs: OrthancServer, refs: list[SeriesRef], tmp_path: Path
) -> None:
    cache = DicomCache(tmp_path)
    wrong = dataclasses.replace(refs[0], n_instances=refs[0].n_instances + 1)
    report = cache.fetch(pacs.pacs_config, [wrong])
    assert (report.fetched, report.cached) == (0, 0)
    assert report.failed[0][0] == wrong.series_uid
    assert f"expected {wrong.n_instances}" in report.failed[0][1]
    assert not cache.is_cached(wrong) and not cache.series_dir(wrong).exists()
    assert _leftovers(cache) == []
    with pytest.raises(LookupError):
        cache.content_hash(wrong)


def test_unknown_count_is_asked_over_qido(pacs: OrthancServer, refs: list[SeriesRef], tmp_path: Path) -> None:
    cache = DicomCache(tmp_path)
    unknown = dataclasses.replace(refs[1], n_instances=None)
    missing = SeriesRef(refs[1].study_uid, "1.2.3.4", "MR", "", None)
    report = cache.fetch(pacs.pacs_config, [unknown, missing])
    assert report.fetched == 1 and cache.is_cached(unknown) and cache.is_cached(refs[1])
    assert report.failed == [("1.2.3.4", f"PACS at {pacs.dicomweb_url}: series 1.2.3.4 not found")]


def test_failing_transport_leaves_nothing_complete(
    pacs: OrthancServer, refs: list[SeriesRef], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_then_fail(config: PacsConfig, ref: SeriesRef, dest: Path) -> int:
        (dest / "1.2.3.dcm").write_bytes(b"partial")
        raise PacsError("connection reset mid-series")

    monkeypatch.setitem(dicom_cache.TRANSPORTS, "dicomweb", half_then_fail)
    cache = DicomCache(tmp_path)
    report = cache.fetch(pacs.pacs_config, refs)
    assert report.fetched == 0 and len(report.failed) == len(refs)
    assert all(reason == "connection reset mid-series" for _, reason in report.failed)
    assert not any(cache.is_cached(r) for r in refs)
    assert not any(cache.series_dir(r).exists() for r in refs) and _leftovers(cache) == []


def test_interrupt_leaves_nothing_complete(
    pacs: OrthancServer, refs: list[SeriesRef], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fetch_then_interrupt(config: PacsConfig, ref: SeriesRef, dest: Path) -> int:
        fetch_series_wado(config, ref, dest)
        raise KeyboardInterrupt

    monkeypatch.setitem(dicom_cache.TRANSPORTS, "dicomweb", fetch_then_interrupt)
    cache = DicomCache(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        cache.fetch(pacs.pacs_config, refs)
    assert not cache.is_cached(refs[0]) and not cache.series_dir(refs[0]).exists() and _leftovers(cache) == []


def test_leftovers_of_a_killed_fetch_are_ignored_then_replaced(
    pacs: OrthancServer, refs: list[SeriesRef], tmp_path: Path
) -> None:
    cache = DicomCache(tmp_path)
    ref = refs[0]
    partial = cache.series_dir(ref).parent / f".{ref.series_uid}.partial-dead"
    partial.mkdir(parents=True)
    (partial / "x.dcm").write_bytes(b"half")
    stray = cache.series_dir(ref)  # a folder without marker, e.g. copied by hand
    stray.mkdir()
    (stray / "junk.dcm").write_bytes(b"junk")
    assert not cache.is_cached(ref)
    assert cache.fetch(pacs.pacs_config, [ref]).fetched == 1
    assert cache.is_cached(ref) and not (stray / "junk.dcm").exists() and _leftovers(cache) == []
    (cache.series_dir(ref) / f"{'9' * 8}.dcm").write_bytes(b"extra")  # tampered: counts disagree
    assert not cache.is_cached(ref)


def test_pacs_crash_midway_then_resumed(
    pacs: OrthancServer, refs: list[SeriesRef], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def stop_after_first(config: PacsConfig, ref: SeriesRef, dest: Path) -> int:
        calls.append(ref.series_uid)
        count = fetch_series_wado(config, ref, dest)
        if len(calls) == 1:
            pacs.kill()  # a crash; a clean stop() behaves the same here but takes ~3.5 s
        return count

    cache = DicomCache(tmp_path)
    monkeypatch.setitem(dicom_cache.TRANSPORTS, "dicomweb", stop_after_first)
    try:
        report = cache.fetch(pacs.pacs_config, refs)
    finally:
        pacs.start()
    assert report.fetched == 1 and len(report.failed) == len(refs) - 1
    assert all(f"PACS at {pacs.dicomweb_url} is unreachable" in reason for _, reason in report.failed)
    assert [cache.is_cached(r) for r in refs] == [True] + [False] * (len(refs) - 1)
    assert _leftovers(cache) == []
    monkeypatch.undo()
    resumed = cache.fetch(pacs.pacs_config, refs)
    assert (resumed.fetched, resumed.cached, resumed.failed) == (len(refs) - 1, 1, [])


def test_pacs_down_and_bad_arguments(refs: list[SeriesRef], tmp_path: Path, closed_port: int) -> None:
    down = PacsConfig(dicomweb_url=f"http://127.0.0.1:{closed_port}/dicom-web", timeout_s=5)
    cache = DicomCache(tmp_path)
    report = cache.fetch(down, refs[:2])
    assert report.fetched == 0 and not report.ok
    assert all(f"PACS at {down.dicomweb_url} is unreachable" in reason for _, reason in report.failed)
    with pytest.raises(ValueError, match="unknown transport"):
        cache.fetch(down, refs, transport="ftp")
    with pytest.raises(ValueError, match="dimse_port"):
        cache.fetch(down, refs, transport="cget")
