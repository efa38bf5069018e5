"""C-GET fetch against a real Orthanc: MR and SEG series byte-for-byte (SOPInstanceUID + pixel data),
and clear errors for an unknown AE title, an unknown series and a PACS that is down.

Fails (not skips) when Orthanc is missing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from jipfed.cohort.model import SeriesRef
from jipfed.imaging.dicomweb import upload_files
from jipfed.imaging.dimse import fetch_series_cget
from jipfed.imaging.pacs import PacsConfig, PacsError
from jipfed.testing.dicom_samples import SampleSeries, instance_signature, synth_dataset
from jipfed.testing.orthanc import OrthancServer


@pytest.fixture(scope="module")
def samples() -> list[SampleSeries]:
    """One case of a ``jipfed synth`` data set: 4 MR series and a SEG (C-GET is slow: ~60 ms/instance)."""
    series = synth_dataset("BRATS SYNTH")
    return [s for s in series if s.study_uid == series[0].study_uid]


@pytest.fixture(scope="module")
def pacs(samples: list[SampleSeries]) -> Iterator[OrthancServer]:
    with OrthancServer() as server:
        assert upload_files(server.pacs_config, [f for s in samples for f in s.files]).ok
        yield server


def _ref(sample: SampleSeries) -> SeriesRef:
    return SeriesRef(
        sample.study_uid, sample.series_uid, sample.modality, sample.description, len(sample.files)
    )


def test_cget_mr_and_seg_byte_for_byte(
    pacs: OrthancServer, samples: list[SampleSeries], tmp_path: Path
) -> None:
    assert {s.modality for s in samples} == {"MR", "SEG"}
    for sample in samples:
        dest = tmp_path / sample.series_uid
        assert fetch_series_cget(pacs.pacs_config, _ref(sample), dest) == len(sample.files)
        uploaded = {instance_signature(p) for p in sample.files}
        fetched = list(dest.iterdir())
        assert {instance_signature(p) for p in fetched} == uploaded
        assert {p.name for p in fetched} == {f"{uid}.dcm" for uid, _ in uploaded}


def test_unknown_calling_aet_is_a_clear_error(
    pacs: OrthancServer, samples: list[SampleSeries], tmp_path: Path
) -> None:
    config = dataclasses.replace(pacs.pacs_config, calling_aet="STRANGER", timeout_s=10)
    with pytest.raises(PacsError, match="STRANGER"):
        fetch_series_cget(config, _ref(samples[0]), tmp_path)


def test_unknown_series_reports_status(pacs: OrthancServer, tmp_path: Path) -> None:
    ref = SeriesRef("1.2.3", "1.2.3.4", "MR", "", 1)
    with pytest.raises(
        PacsError, match=r"ORTHANC@127\.0\.0\.1:\d+: C-GET of series 1\.2\.3\.4 ended with status 0x"
    ):
        fetch_series_cget(pacs.pacs_config, ref, tmp_path)


def test_pacs_down_and_no_dimse(samples: list[SampleSeries], tmp_path: Path, closed_port: int) -> None:
    port = closed_port
    config = PacsConfig(dicomweb_url="http://127.0.0.1:1/dicom-web", dimse_port=port, timeout_s=5)
    with pytest.raises(PacsError, match=f"127.0.0.1:{port}: association as JIPFED"):
        fetch_series_cget(config, _ref(samples[0]), tmp_path)
    with pytest.raises(ValueError, match="dimse_port is None"):
        fetch_series_cget(dataclasses.replace(config, dimse_port=None), _ref(samples[0]), tmp_path)
