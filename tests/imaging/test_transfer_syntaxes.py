"""Real-world DICOM end to end: a synthetic case re-encoded in every transfer syntax the installed
encoders write, as Enhanced (multi-frame) MR, with stray objects, and damaged in each way
(:mod:`jipfed.testing.transfer_syntaxes`), pushed through the converter from a folder, the STOW-RS
upload and both fetch transports (WADO-RS, C-GET) of a real Orthanc.

Every decodable variant must convert voxel-identical to the uncompressed original (image and
label arrays equal, affine within 1e-4 mm); every damaged one is skipped with its reason; no run
aborts. ``pytest -s`` prints the table variant → outcome per path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from jipfed.imaging.convert import ConversionReport, case_key_for, convert_cases
from jipfed.imaging.dicom_cache import DicomCache, FetchReport
from jipfed.imaging.dicomweb import UploadReport, query_series, upload_folder
from jipfed.imaging.synth import default_site_profiles, write_dataset
from jipfed.testing.corrupt import fetch_layout
from jipfed.testing.orthanc import OrthancServer
from jipfed.testing.transfer_syntaxes import SYNTAXES, Variant, available_syntaxes, build_corpus

SHAPE = (32, 32, 8)  # rows, cols, slices: JPEG 2000 (openjpeg) needs at least 32 x 32 pixels
AFFINE_TOL_MM = 1e-4
#: Variants damaged so that the file cannot be read here: STOW-RS does not send it, the PACS gets
#: the series without that slice, so a fetched copy is skipped for the missing slice. (A file cut
#: inside uncompressed pixel data still parses: it is sent, and skipped after the fetch.)
NOT_UPLOADED = (
    "truncated-rle",
    "truncated-jpeg2000",
    "bad_vr-explicit_le",
    "damaged_deflate-deflated",
    "cut_deflate-deflated",
)


@dataclasses.dataclass(frozen=True)
class Corpus:
    original: Path  # the synthetic case as written (Explicit VR Little Endian)
    variants: tuple[Variant, ...]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a run did with one variant: converted (voxel-identical or not) or skipped, and why."""

    converted: bool
    identical: bool = False
    reason: str = ""
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.converted:
            text = "converted, voxel-identical" if self.identical else "converted, DIFFERENT voxels"
            return text + (f" ({len(self.notes)} object(s) left out)" if self.notes else "")
        return f"skipped: {self.reason}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("ts-corpus")
    (profile,) = default_site_profiles(1, 1, orientations=["oblique"])
    write_dataset(root / "synth", [profile], shape=SHAPE, seed=5, progress=False)
    case_dir = next((root / "synth" / profile.site_id / "dicom").iterdir())
    return Corpus(case_dir, tuple(build_corpus(case_dir, root / "corpus")))


@pytest.fixture(scope="module")
def reference(
    corpus: Corpus, tmp_path_factory: pytest.TempPathFactory
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, label, affine) of the original, uncompressed case."""
    root = tmp_path_factory.mktemp("ts-reference")
    study = fetch_layout(corpus.original, root / "dicom")
    report = convert_cases([study], root / "nifti")
    assert report.converted == [case_key_for(study.name)], report.skipped
    return _load(root / "nifti" / report.converted[0])


@pytest.fixture(scope="module")
def pacs(corpus: Corpus) -> Iterator[tuple[OrthancServer, dict[str, UploadReport]]]:
    """One Orthanc holding every variant, uploaded over STOW-RS, and the upload reports."""
    with OrthancServer() as server:
        uploads = {v.name: upload_folder(server.pacs_config, v.case_dir) for v in corpus.variants}
        yield server, uploads


def _load(case_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image, label = nib.load(case_dir / "image.nii.gz"), nib.load(case_dir / "label.nii.gz")
    return np.asarray(image.dataobj), np.asarray(label.dataobj), image.affine


def _outcomes(
    report: ConversionReport, out: Path, studies: dict[str, str], reference: tuple[np.ndarray, ...]
) -> dict[str, Outcome]:
    """Variant name → outcome, from a conversion report (``studies``: case_key → variant)."""
    assert not set(report.cached), "a fresh output folder caches nothing"
    outcomes = {studies[key]: Outcome(False, reason=reason) for key, _folder, reason in report.skipped}
    for key in report.converted:
        image, label, affine = _load(out / key)
        identical = (
            image.shape == reference[0].shape
            and np.array_equal(image, reference[0])
            and np.array_equal(label, reference[1])
            and bool(np.abs(affine - reference[2]).max() <= AFFINE_TOL_MM)
        )
        notes = tuple(reason for k, _folder, reason in report.ignored if k == key)
        outcomes[studies[key]] = Outcome(True, identical=identical, notes=notes)
    return outcomes


def _check(variants: tuple[Variant, ...], outcomes: dict[str, Outcome], fetched: bool) -> None:
    """Decodable variants identical, damaged ones skipped with their reason (or, where the
    damaged file never reached the PACS, for the slice it lacks)."""
    assert set(outcomes) == {v.name for v in variants}, "every variant has an outcome: no run aborted"
    for variant in variants:
        outcome = outcomes[variant.name]
        if variant.defect is None:
            assert outcome.converted and outcome.identical, (variant.name, str(outcome))
        elif fetched and variant.name in NOT_UPLOADED:
            assert not outcome.converted and "missing slice" in outcome.reason, (variant.name, outcome)
        elif fetched and variant.name.startswith("split_patients"):
            assert not outcome.converted and "missing channel(s) ['FLAIR']" in outcome.reason, outcome
        else:
            assert not outcome.converted and variant.defect in outcome.reason, (variant.name, outcome)
            assert f'"{variant.channel}"' in outcome.reason, "the reason names the series"
    stray = outcomes["stray_objects"]
    assert len(stray.notes) == 3 and all("left out of series" in note for note in stray.notes)


def _print_table(title: str, outcomes: dict[str, Outcome]) -> None:
    print(f"\n{title}")  # noqa: T201 - the closing note's table (pytest -s)
    for name in sorted(outcomes):
        print(f"| {name} | {outcomes[name]} |")  # noqa: T201


def test_installed_encoders_write_every_syntax(corpus: Corpus) -> None:
    usable, missing = available_syntaxes(next((corpus.original / "FLAIR").iterdir()))
    assert missing == {} and set(usable) == set(SYNTAXES)


def test_variants_are_encoded_as_named_and_decode_losslessly(corpus: Corpus) -> None:
    originals = {
        pydicom.dcmread(p).InstanceNumber: pydicom.dcmread(p).pixel_array
        for p in (corpus.original / "FLAIR").iterdir()
    }
    for variant in corpus.variants:
        if variant.name not in SYNTAXES:
            continue
        for path in (variant.case_dir / "FLAIR").iterdir():
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == SYNTAXES[variant.name], variant.name
            np.testing.assert_array_equal(ds.pixel_array, originals[ds.InstanceNumber])


def test_converter_from_folders(corpus: Corpus, reference: tuple, tmp_path: Path) -> None:
    studies = {}
    for variant in corpus.variants:
        study = fetch_layout(variant.case_dir, tmp_path / "dicom")
        studies[case_key_for(study.name)] = variant.name
    report = convert_cases(
        [tmp_path / "dicom" / s for s in sorted(p.name for p in (tmp_path / "dicom").iterdir())],
        tmp_path / "nifti",
    )
    outcomes = _outcomes(report, tmp_path / "nifti", studies, reference)
    _print_table("from folders", outcomes)
    _check(corpus.variants, outcomes, fetched=False)


def test_stow_upload_reports_damaged_files_and_stores_the_rest(corpus: Corpus, pacs: tuple) -> None:
    _server, uploads = pacs
    for variant in corpus.variants:
        report = uploads[variant.name]
        assert report.failed == () and report.stored == report.files, variant.name
        if variant.name in NOT_UPLOADED:
            ((path, reason),) = report.unreadable
            assert Path(path).parent.name == variant.channel and reason, variant.name
        else:
            assert report.ok and report.files == sum(1 for _ in variant.case_dir.rglob("*.dcm")), variant.name


def _fetch_and_convert(
    corpus: Corpus, reference: tuple, pacs: tuple, transport: str, tmp_path: Path
) -> tuple[FetchReport, dict[str, Outcome]]:
    server, _uploads = pacs
    refs = query_series(server.pacs_config)
    cache = DicomCache(tmp_path / "site")
    fetch = cache.fetch(server.pacs_config, refs, transport)
    studies = {}
    for variant in corpus.variants:
        study_uid = str(
            pydicom.dcmread(next(variant.case_dir.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
        )
        studies[case_key_for(study_uid)] = variant.name
        # instances arrive in the syntax they were stored in
        for path in (cache.dicom_root / study_uid).rglob("*.dcm"):
            uploaded = SYNTAXES.get(variant.name)
            if uploaded is not None and pydicom.dcmread(path, stop_before_pixels=True).Modality == "MR":
                assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == uploaded
    report = convert_cases(sorted(cache.dicom_root.iterdir()), tmp_path / "nifti")
    return fetch, _outcomes(report, tmp_path / "nifti", studies, reference)


@pytest.mark.parametrize(
    "transport",
    ["dicomweb", pytest.param("cget", marks=pytest.mark.slow)],  # C-GET: ~0.5 s per series
)
def test_fetch_then_convert(
    corpus: Corpus, reference: tuple, pacs: tuple, transport: str, tmp_path: Path
) -> None:
    fetch, outcomes = _fetch_and_convert(corpus, reference, pacs, transport, tmp_path)
    _print_table(f"fetched over {transport}", outcomes)
    (failed,) = fetch.failed  # only the series split across two patients
    assert 'series "FLAIR"' in failed[1] and "split across 2 patients or studies" in failed[1]
    _check(corpus.variants, outcomes, fetched=True)
