"""STOW-RS upload, QIDO-RS search (Orthanc's percent-encoding pitfall) and WADO-RS fetch against a
real Orthanc, plus PacsConfig validation and the ``jipfed pacs upload`` command.

Fails (not skips) when Orthanc is missing. One Orthanc per module holds a two-case ``jipfed synth``
data set "BRATS SYNTH" and a tiny one-case set "BRATS-SYNTH" (StudyDescriptions that differ only by
a space vs a hyphen: Orthanc's percent-encoding pitfall).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests

from jipfed.cli import main as cli_main
from jipfed.cohort.model import SeriesRef
from jipfed.imaging.dicomweb import (
    fetch_series_wado,
    query_series,
    quote_qido_value,
    upload_files,
    upload_folder,
)
from jipfed.imaging.pacs import PacsConfig, PacsError
from jipfed.testing.dicom_samples import (
    SampleSeries,
    series_in_folder,
    synth_dataset,
    write_sample_dataset,
)
from jipfed.testing.orthanc import OrthancServer

SPACED, HYPHENATED = "BRATS SYNTH", "BRATS-SYNTH"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dicomweb-tiny")
    write_sample_dataset(folder, n_cases=1, study_description=HYPHENATED, seed=2)
    (folder / "README.txt").write_text("not DICOM")
    return folder


@pytest.fixture(scope="module")
def datasets(tiny_folder: Path) -> dict[str, list[SampleSeries]]:
    return {SPACED: list(synth_dataset(SPACED)), HYPHENATED: series_in_folder(tiny_folder)}


@pytest.fixture(scope="module")
def pacs(datasets: dict[str, list[SampleSeries]]) -> Iterator[OrthancServer]:
    with OrthancServer() as server:
        for samples in datasets.values():
            assert upload_files(server.pacs_config, [f for s in samples for f in s.files]).ok
        yield server


def _by_uid(samples: list[SampleSeries]) -> dict[str, SampleSeries]:
    return {s.series_uid: s for s in samples}


def test_upload_report(pacs: OrthancServer, tiny_folder: Path) -> None:
    n_files = sum(len(s.files) for s in series_in_folder(tiny_folder))
    report = upload_folder(pacs.pacs_config, tiny_folder, batch_size=3)  # again: Orthanc acknowledges
    assert (report.files, report.stored, report.failed) == (n_files, n_files, ())
    assert report.skipped == (str(tiny_folder / "README.txt"),)
    assert report.ok


def test_upload_reports_the_damaged_instance(pacs: OrthancServer, tmp_path: Path) -> None:
    """An instance without SeriesInstanceUID (Orthanc would answer HTTP 400 to its whole STOW-RS
    request) is reported as unreadable and not sent; the others are stored."""
    written = write_sample_dataset(tmp_path, n_cases=1, study_description="BAD UPLOAD", seed=10)
    bad = written[0].files[1]
    ds = pydicom.dcmread(bad)
    del ds.SeriesInstanceUID
    ds.save_as(bad)
    report = upload_folder(pacs.pacs_config, tmp_path)
    ((path, reason),) = report.unreadable
    assert path == str(bad) and "lacks SeriesInstanceUID" in reason
    assert (report.files, report.stored, report.failed, report.ok) == (8, 8, (), False)
    found = query_series(pacs.pacs_config, StudyDescription="BAD UPLOAD")
    assert sorted(r.n_instances for r in found) == [1, 3, 4]


@pytest.mark.parametrize("description", [SPACED, HYPHENATED, "brats synth"])
def test_query_by_study_description(
    pacs: OrthancServer, datasets: dict[str, list[SampleSeries]], description: str
) -> None:
    expected = _by_uid(datasets[HYPHENATED if "-" in description else SPACED])
    refs = query_series(pacs.pacs_config, StudyDescription=description)
    assert {r.series_uid for r in refs} == set(expected)  # "?" for the space must not pull in "BRATS-SYNTH"
    for ref in refs:
        sample = expected[ref.series_uid]
        assert (ref.study_uid, ref.modality, ref.description, ref.n_instances) == (
            sample.study_uid,
            sample.modality,
            sample.description,
            len(sample.files),
        )


def test_query_wildcards_and_other_filters(
    pacs: OrthancServer, datasets: dict[str, list[SampleSeries]]
) -> None:
    config = pacs.pacs_config
    everything = {**_by_uid(datasets[SPACED]), **_by_uid(datasets[HYPHENATED])}
    assert {r.series_uid for r in query_series(config, StudyDescription="BRATS*")} == set(everything)
    segs = query_series(
        config, SeriesDescription="Tumor segmentation", Modality="SEG", StudyDescription="BRATS*"
    )
    assert {r.series_uid for r in segs} == {uid for uid, s in everything.items() if s.modality == "SEG"}
    t1s = query_series(config, SeriesDescription="t1*", StudyDescription=SPACED)
    assert sorted(r.description for r in t1s) == ["T1", "T1", "T1c", "T1c"]
    one = next(iter(everything.values()))
    by_uid = query_series(config, StudyInstanceUID=one.study_uid, SeriesInstanceUID=one.series_uid)
    assert [r.series_uid for r in by_uid] == [one.series_uid]
    assert query_series(config, StudyDescription="BRATS & SYNTH") == []
    with pytest.raises(ValueError, match="unsupported QIDO filter"):
        query_series(config, PatientName="x")
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        query_series(config, StudyInstanceUID="1.2&x=3")


def test_orthanc_ignores_percent_encoding(pacs: OrthancServer) -> None:
    """Why query_series writes its own query string (field-notes.md): %20 matches nothing."""
    url = f"{pacs.dicomweb_url}/series?StudyDescription=BRATS%20SYNTH"
    response = requests.get(url, auth=pacs.pacs_config.auth, timeout=10)
    assert response.status_code == 200
    assert response.json() == []


def test_quote_qido_value() -> None:
    assert quote_qido_value("BRATS SYNTH") == "BRATS?SYNTH"
    assert quote_qido_value("T1*") == "T1*"
    assert quote_qido_value("a&b=c+d#é") == "a?b?c?d??"
    with pytest.raises(ValueError, match="empty"):
        quote_qido_value("")


def test_fetch_series_wado_byte_for_byte(
    pacs: OrthancServer, datasets: dict[str, list[SampleSeries]], tmp_path: Path
) -> None:
    for sample in datasets[SPACED]:
        ref = SeriesRef(
            sample.study_uid, sample.series_uid, sample.modality, sample.description, len(sample.files)
        )
        dest = tmp_path / sample.series_uid
        assert fetch_series_wado(pacs.pacs_config, ref, dest) == len(sample.files)
        uploaded = {
            str(pydicom.dcmread(p, specific_tags=["SOPInstanceUID"]).SOPInstanceUID): p for p in sample.files
        }
        fetched = {p.name: p.read_bytes() for p in dest.iterdir()}
        # named <SOPInstanceUID>.dcm, and the whole file (pixel data included) is what was uploaded
        assert fetched == {f"{uid}.dcm": p.read_bytes() for uid, p in uploaded.items()}


def test_fetch_unknown_series_names_pacs(pacs: OrthancServer, tmp_path: Path) -> None:
    ref = SeriesRef("1.2.3", "1.2.3.4", "MR", "", 1)
    with pytest.raises(PacsError, match=f"PACS at {pacs.dicomweb_url}.*HTTP 404"):
        fetch_series_wado(pacs.pacs_config, ref, tmp_path)


def test_wrong_credentials(pacs: OrthancServer) -> None:
    config = PacsConfig(dicomweb_url=pacs.dicomweb_url, username="jipfed", password="wrong")
    with pytest.raises(PacsError, match="HTTP 401 .*authentication failed"):
        query_series(config, Modality="MR")


def test_pacs_down_names_url(tmp_path: Path, tiny_folder: Path, closed_port: int) -> None:
    config = PacsConfig(
        dicomweb_url=f"http://127.0.0.1:{closed_port}/dicom-web", username="u", password="p", timeout_s=5
    )
    for call in (
        lambda: query_series(config, Modality="MR"),
        lambda: upload_folder(config, tiny_folder),
        lambda: fetch_series_wado(config, SeriesRef("1.2", "1.2.3", "MR", "", 1), tmp_path),
    ):
        with pytest.raises(PacsError, match=f"PACS at {config.dicomweb_url} is unreachable"):
            call()


def test_cli_upload(pacs: OrthancServer, tmp_path: Path) -> None:
    written = write_sample_dataset(tmp_path / "cli", n_cases=1, study_description="CLI UPLOAD", seed=3)
    config = pacs.pacs_config
    command = ["pacs", "upload", "--url", config.dicomweb_url, "--user", "jipfed"]
    assert cli_main([*command, f"--password={pacs.password}", str(tmp_path)]) == 0
    found = query_series(config, StudyDescription="CLI UPLOAD")
    assert {r.series_uid for r in found} == {s.series_uid for s in written}
    assert cli_main([*command, "--password=wrong", str(tmp_path)]) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dicomweb_url": "ftp://x/dicom-web"}, "http"),
        ({"dicomweb_url": "http:///dicom-web"}, "host"),
        ({"dicomweb_url": "http://h/dw?x=1"}, "query"),
        ({"dicomweb_url": "http://h", "username": "u"}, "together"),
        ({"dicomweb_url": "http://h", "dimse_port": 0}, "dimse_port"),
        ({"dicomweb_url": "http://h", "dimse_port": True}, "dimse_port"),
        ({"dicomweb_url": "http://h", "called_aet": "A" * 17}, "called_aet"),
        ({"dicomweb_url": "http://h", "calling_aet": "A\\B"}, "calling_aet"),
        ({"dicomweb_url": "http://h", "calling_aet": "  "}, "calling_aet"),
        ({"dicomweb_url": "http://h", "timeout_s": 0}, "timeout_s"),
    ],
)
def test_pacs_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PacsConfig(**kwargs)


def test_pacs_config_normalises_and_hides_password() -> None:
    config = PacsConfig(dicomweb_url="http://h:1/dicom-web/", username="u", password="topsecret")
    assert config.dicomweb_url == "http://h:1/dicom-web"
    assert config.auth == ("u", "topsecret")
    assert "topsecret" not in repr(config)
    assert PacsConfig(dicomweb_url="https://h/dw").auth is None
