"""select_cohort over QIDO-RS against a real Orthanc, and the cohort model's validation.

Fails (not skips) when Orthanc is missing. The PACS holds a two-case ``jipfed synth`` data set
"BRATS SYNTH" (a space: Orthanc's percent-encoding pitfall) and a tiny one-case set "BRATS-SYNTH",
which must not leak into the former.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from jipfed.cohort.model import CohortCase, SeriesRef, group_by_study
from jipfed.cohort.qido import select_cohort
from jipfed.imaging.dicomweb import upload_files
from jipfed.testing.dicom_samples import SampleSeries, series_in_folder, synth_dataset, write_sample_dataset
from jipfed.testing.orthanc import OrthancServer


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[SampleSeries]]:
    root = tmp_path_factory.mktemp("qido-data")
    write_sample_dataset(root, n_cases=1, study_description="BRATS-SYNTH", seed=7)
    return {"BRATS SYNTH": list(synth_dataset("BRATS SYNTH")), "BRATS-SYNTH": series_in_folder(root)}


@pytest.fixture(scope="module")
def pacs(data: dict[str, list[SampleSeries]]) -> Iterator[OrthancServer]:
    with OrthancServer() as server:
        files = [f for samples in data.values() for s in samples for f in s.files]
        assert upload_files(server.pacs_config, files).ok
        yield server


def _expected(samples: list[SampleSeries], modalities: tuple[str, ...]) -> dict[str, set[str]]:
    by_study: dict[str, set[str]] = {}
    for s in samples:
        if s.modality in modalities:
            by_study.setdefault(s.study_uid, set()).add(s.series_uid)
    return by_study


@pytest.mark.parametrize("dataset", ["BRATS SYNTH", "BRATS-SYNTH"])
def test_select_cohort_groups_by_study(
    pacs: OrthancServer, data: dict[str, list[SampleSeries]], dataset: str
) -> None:
    cases = select_cohort(pacs.pacs_config, dataset=dataset)
    expected = _expected(data[dataset], ("MR", "SEG"))
    assert [c.study_uid for c in cases] == sorted(expected)
    samples = {s.series_uid: s for s in data[dataset]}
    for case in cases:
        assert {r.series_uid for r in case.series} == expected[case.study_uid]
        for ref in case.series:
            sample = samples[ref.series_uid]
            assert (ref.modality, ref.description, ref.n_instances) == (
                sample.modality,
                sample.description,
                len(sample.files),
            )
        assert [r.modality for r in case.series][-1] == "SEG"  # sorted by (modality, description)


def test_select_cohort_modalities_and_misses(
    pacs: OrthancServer, data: dict[str, list[SampleSeries]]
) -> None:
    segs = select_cohort(pacs.pacs_config, dataset="brats synth", modalities=("SEG",))
    assert {c.study_uid: {r.series_uid for r in c.series} for c in segs} == _expected(
        data["BRATS SYNTH"], ("SEG",)
    )
    assert select_cohort(pacs.pacs_config, dataset="NO SUCH DATASET") == []
    assert select_cohort(pacs.pacs_config, dataset="BRATS SYNTH", modalities=("CT",)) == []
    with pytest.raises(ValueError, match="dataset"):
        select_cohort(pacs.pacs_config, dataset=" ")
    with pytest.raises(ValueError, match="modalities"):
        select_cohort(pacs.pacs_config, modalities="MR")


def test_model_validation_and_grouping() -> None:
    a = SeriesRef("1.2.3", "1.2.3.1", "MR", "T1", 4)
    b = SeriesRef("1.2.3", "1.2.3.2", "SEG", "Tumor segmentation", 1)
    c = SeriesRef("1.2.4", "1.2.4.1", "CT", "", None)
    assert group_by_study([b, c, a, a], ("mr", "SEG")) == [CohortCase("1.2.3", (a, b))]
    with pytest.raises(ValueError, match="series_uid"):
        SeriesRef("1.2.3", "../etc", "MR", "", 1)
    with pytest.raises(ValueError, match="study_uid"):
        SeriesRef("1." + "1" * 64, "1.2", "MR", "", 1)
    with pytest.raises(ValueError, match="n_instances"):
        SeriesRef("1.2", "1.2.3", "MR", "", -1)
    with pytest.raises(ValueError, match="belongs to study"):
        CohortCase("1.2.4", (a,))
    with pytest.raises(ValueError, match="tuple"):
        CohortCase("1.2.3", [a])  # type: ignore[arg-type]
