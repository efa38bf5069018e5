"""Case conversion end to end: synthetic DICOM → NIfTI compared with the synthetic ground truth.

Ground truth (``jipfed.imaging.synth``) is in DICOM index space (slice, row, column) with its
geometry; the converted NIfTI is in dcm2niix's voxel order. Each test maps one into the other
through the affines, so labels and images are compared voxel by voxel (exactly: dcm2niix does
not rescale these integer series) and the NIfTI affine is compared in mm with the affine built
from the truth geometry.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.pixels import pack_bits
from pydicom.uid import generate_uid

from jipfed.imaging.convert import (
    DEFAULT_CHANNEL_MAP,
    ConversionReport,
    Dcm2niixError,
    case_key_for,
    convert_case,
    convert_cases,
    run_dcm2niix,
)
from jipfed.imaging.seg_labels import RAS_TO_LPS, SegRejected, seg_label_map
from jipfed.imaging.synth import default_site_profiles, write_dataset
from jipfed.testing.corrupt import (
    CORRUPTIONS,
    corrupt_case,
    fetch_layout,
    find_series,
    missing_slice,
    slices_along_normal,
)

SHAPE = (20, 16, 10)  # rows, cols, slices
ORIENTATIONS = ("axial", "sagittal", "coronal", "oblique")
#: corruption → the words its skip reason must contain (None: converts, the stray object left out)
EXPECTED_REASONS: dict[str, str | None] = {
    "missing_slice": "missing slice",
    "mixed_orientation": "mixed ImageOrientationPatient",
    "non_image_sop_class": None,
    "unreadable_file": "truncated",
    "seg_foreign_frame_of_reference": "FrameOfReferenceUID differs",
    "seg_unknown_reference": "not in the case",
    "missing_edge_slice": "channel grids differ",
}


@dataclasses.dataclass
class Dataset:
    good: dict[str, tuple[Path, dict[str, Any]]]  # orientation → (study folder, truth)
    held_back: Path  # a good study not in the first runs
    corrupt: dict[str, tuple[Path, Path]]  # kind → (study folder, folder to blame)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    root = tmp_path_factory.mktemp("convert")
    profiles = default_site_profiles(len(ORIENTATIONS), 1, orientations=list(ORIENTATIONS))
    profiles[0] = dataclasses.replace(profiles[0], n_cases=2 + len(EXPECTED_REASONS))
    profiles[1] = dataclasses.replace(profiles[1], pixel_signed=True)
    write_dataset(root / "synth", profiles, shape=SHAPE, seed=1, progress=False)
    dicom = root / "dicom"
    good, cases = {}, {}
    for profile in profiles:
        for case_dir in sorted((root / "synth" / profile.site_id / "dicom").iterdir()):
            truth = dict(np.load(root / "synth" / profile.site_id / "truth" / f"{case_dir.name}.npz"))
            cases.setdefault(profile.orientation, []).append((fetch_layout(case_dir, dicom), truth))
        good[profile.orientation] = cases[profile.orientation][0]
    spare = [study for study, _ in cases["axial"][1:]]
    corrupt = {}
    for kind, study in zip(EXPECTED_REASONS, spare[1:], strict=True):
        if kind == "missing_edge_slice":
            missing_slice(study, edge=True)
            corrupt[kind] = (study, study)
        else:
            corrupt[kind] = (study, corrupt_case(study, kind))
    return Dataset(good=good, held_back=spare[0], corrupt=corrupt)


@pytest.fixture(scope="module")
def first_run(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> tuple[ConversionReport, Path]:
    out = tmp_path_factory.mktemp("nifti")
    studies = [s for s, _ in dataset.good.values()] + [s for s, _ in dataset.corrupt.values()]
    return convert_cases(studies, out), out


def truth_affine(truth: dict[str, Any]) -> np.ndarray:
    """Voxel index (slice, row, column) → LPS mm, from the truth geometry."""
    affine = np.eye(4)
    affine[:3, 0] = truth["normal"] * float(truth["slice_spacing"])
    affine[:3, 1] = truth["col_cosine"] * float(truth["pixel_spacing"][0])
    affine[:3, 2] = truth["row_cosine"] * float(truth["pixel_spacing"][1])
    affine[:3, 3] = truth["origin"]
    return affine


def truth_in_nifti_grid(truth: dict[str, Any], nifti_affine: np.ndarray) -> tuple[np.ndarray, ...]:
    """NIfTI voxel indices of every truth voxel (slice, row, column), as a fancy index."""
    m = np.linalg.solve(RAS_TO_LPS @ nifti_affine, truth_affine(truth))
    mapping = np.rint(m).astype(int)
    assert np.abs(m - mapping).max() < 1e-3, "truth voxel centres are not NIfTI voxel centres"
    grid = np.indices(truth["label"].shape).reshape(3, -1)
    index = mapping[:3, :3] @ grid + mapping[:3, 3:]
    return tuple(i.reshape(truth["label"].shape) for i in index)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_converted_case_equals_truth(dataset: Dataset, first_run: tuple, orientation: str) -> None:
    report, out = first_run
    study, truth = dataset.good[orientation]
    key = case_key_for(study.name)
    assert key in report.converted
    image, label = nib.load(out / key / "image.nii.gz"), nib.load(out / key / "label.nii.gz")
    assert image.shape == (SHAPE[1], SHAPE[0], SHAPE[2], 4) and label.shape == image.shape[:3]
    assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(label.affine, image.affine)

    index = truth_in_nifti_grid(truth, image.affine)
    # geometry: the NIfTI affine equals the truth geometry's affine, axes permuted/flipped, in mm
    corner = np.array([[i[0, 0, 0], i[-1, 0, 0], i[0, -1, 0], i[0, 0, -1]] for i in index])
    lps = RAS_TO_LPS @ image.affine @ np.vstack([corner, np.ones(4)])
    expected = truth_affine(truth) @ np.array(
        [[0, SHAPE[2] - 1, 0, 0], [0, 0, SHAPE[0] - 1, 0], [0, 0, 0, SHAPE[1] - 1], [1, 1, 1, 1]]
    )
    np.testing.assert_allclose(lps, expected, atol=1e-4)
    # every voxel of the NIfTI grid is covered once
    assert len({tuple(v) for v in np.stack(index, -1).reshape(-1, 3)}) == np.prod(SHAPE)
    # labels exactly; images exactly (tolerance 0: integer series, no rescaling by dcm2niix)
    np.testing.assert_array_equal(np.asarray(label.dataobj)[index], truth["label"])
    stored = np.moveaxis(np.asarray(image.dataobj)[index], -1, 0)
    np.testing.assert_array_equal(stored, truth["images"])

    meta = json.loads((out / key / "case.json").read_text())
    assert meta["case_key"] == key and meta["channels"] == ["FLAIR", "T1", "T1c", "T2"]
    assert meta["grade"] == str(truth["grade"])
    assert meta["label_values"] == sorted(int(v) for v in np.unique(truth["label"]) if v)
    assert meta["shape"] == list(image.shape[:3])
    np.testing.assert_allclose(meta["spacing"], image.header.get_zooms()[:3], atol=1e-5)
    assert len(meta["content_hash"]) == 64


def test_case_json_holds_no_uid_or_patient_data(dataset: Dataset, first_run: tuple) -> None:
    _, out = first_run
    study, _ = dataset.good["oblique"]
    text = (out / case_key_for(study.name) / "case.json").read_text()
    header = pydicom.dcmread(slices_along_normal(find_series(study))[0], stop_before_pixels=True)
    for secret in (
        header.StudyInstanceUID,
        header.SeriesInstanceUID,
        header.FrameOfReferenceUID,
        header.PatientID,
    ):
        assert str(secret) not in text
    assert "SYN-" not in text and "2.25." not in text


def test_each_corruption_skipped_with_reason_others_convert(dataset: Dataset, first_run: tuple) -> None:
    report, _ = first_run
    skipped = {key: (folder, reason) for key, folder, reason in report.skipped}
    assert len(report.skipped) == sum(reason is not None for reason in EXPECTED_REASONS.values())
    converted = [case_key_for(s.name) for s, _ in dataset.good.values()]
    for kind, (study, blamed) in dataset.corrupt.items():
        expected = EXPECTED_REASONS[kind]
        if expected is None:  # converted; the stray object is reported as left out
            converted.append(case_key_for(study.name))
            notes = [(f, r) for key, f, r in report.ignored if key == converted[-1]]
            assert [(Path(f).parent, "Basic Text SR" in r) for f, r in notes] == [(blamed, True)]
            continue
        folder, reason = skipped[case_key_for(study.name)]
        assert folder == str(blamed), kind
        assert expected in reason, (kind, reason)
    assert sorted(report.converted) == sorted(converted)
    assert report.cached == []


def test_report_file_is_the_report(first_run: tuple) -> None:
    report, out = first_run
    path = Path(report.report_file)
    assert path.parent == out / "reports" and path.name.startswith("convert-")
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(report.to_dict()))
    assert "local_only" in data


def test_second_run_is_all_cached(dataset: Dataset, first_run: tuple) -> None:
    first, out = first_run
    studies = [s for s, _ in dataset.good.values()] + [s for s, _ in dataset.corrupt.values()]
    before = {key: (out / key / "image.nii.gz").stat().st_ino for key in first.converted}
    second = convert_cases(studies, out)
    assert second.converted == []
    assert sorted(second.cached) == sorted(first.converted)
    assert sorted(second.skipped) == sorted(first.skipped)
    assert {key: (out / key / "image.nii.gz").stat().st_ino for key in first.converted} == before


def test_new_case_only_it_converted(dataset: Dataset, first_run: tuple, tmp_path: Path) -> None:
    first, out = first_run
    out = Path(shutil.copytree(out, tmp_path / "nifti"))
    report = convert_cases([s for s, _ in dataset.good.values()] + [dataset.held_back], out)
    assert report.converted == [case_key_for(dataset.held_back.name)]
    good = [case_key_for(s.name) for s, _ in dataset.good.values()]
    assert sorted(report.cached) == sorted(good) and report.skipped == []


def test_changed_content_or_settings_converts_again(dataset: Dataset, tmp_path: Path) -> None:
    study = Path(
        shutil.copytree(dataset.good["axial"][0], tmp_path / "dicom" / dataset.good["axial"][0].name)
    )
    out = tmp_path / "nifti"
    first = convert_case(study, out)
    assert not first.cached and convert_case(study, out).cached
    path = slices_along_normal(find_series(study, description="T2"))[0]
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.copy()
    pixels[0, 0] += 7
    ds.PixelData = pixels.tobytes()
    ds.save_as(path)
    again = convert_case(study, out)
    assert not again.cached and again.content_hash != first.content_hash
    image = np.asarray(nib.load(out / first.case_key / "image.nii.gz").dataobj)
    truth_t2 = dataset.good["axial"][1]["images"][3]
    assert int(image[..., 3].astype(np.int64).sum()) == int(truth_t2.astype(np.int64).sum()) + 7
    two_channels = {"T2": ("t2",), "FLAIR": ("flair",)}
    custom = convert_case(study, out, two_channels)
    assert not custom.cached and custom.channels == ("T2", "FLAIR")
    assert nib.load(out / first.case_key / "image.nii.gz").shape[-1] == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_description_aliases_and_unmapped_series(dataset: Dataset, first_run: tuple, tmp_path: Path) -> None:
    _, first_out = first_run
    source = dataset.good["sagittal"][0]
    study = Path(shutil.copytree(source, tmp_path / "dicom" / source.name))
    for path in find_series(study, description="T1c").iterdir():
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = "T1 POST"
        ds.save_as(path)
    extra_uid = generate_uid()
    extra = Path(shutil.copytree(find_series(study, description="T2"), study / extra_uid))
    for path in extra.iterdir():
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SeriesDescription, ds.SOPInstanceUID = extra_uid, "Localizer", generate_uid()
        ds.save_as(path)
    report = convert_cases([study], tmp_path / "nifti")
    key = case_key_for(study.name)
    assert report.converted == [key]
    assert [(k, f) for k, f, _ in report.ignored] == [(key, str(extra))]
    converted = nib.load(tmp_path / "nifti" / key / "image.nii.gz").get_fdata()
    np.testing.assert_array_equal(converted, nib.load(first_out / key / "image.nii.gz").get_fdata())


def test_missing_or_duplicate_channel_rejected(dataset: Dataset, tmp_path: Path) -> None:
    source = dataset.good["coronal"][0]
    study = Path(shutil.copytree(source, tmp_path / "dicom" / source.name))
    shutil.rmtree(find_series(study, description="T2"))
    duplicate = {**DEFAULT_CHANNEL_MAP, "T2": ("t2", "t1")}
    with pytest.raises(ValueError, match="maps to"):
        convert_cases([study], tmp_path / "nifti", duplicate)
    report = convert_cases([study], tmp_path / "nifti")
    assert report.skipped == [(case_key_for(study.name), str(study), "missing channel(s) ['T2']")]


def test_dcm2niix_failure_reports_exit_status(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(Dcm2niixError, match="exited with 2"):
        run_dcm2niix(tmp_path / "empty", tmp_path / "out", "x")


def seg_from_masks(study: Path, masks: list[np.ndarray], path: Path, *, reverse_frames: bool) -> Path:
    """A BINARY SEG on the study's T1c series at ``path``; ``masks[i]`` is segment i + 1, each
    (slice, row, column) in DICOM order."""
    sources = [pydicom.dcmread(p) for p in slices_along_normal(find_series(study, description="T1c"))]
    stack = np.stack(masks, axis=-1)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=f"label {i + 1}",
            segmented_property_category=hd.sr.CodedConcept(
                "49755003", "SCT", "Morphologically abnormal structure"
            ),
            segmented_property_type=hd.sr.CodedConcept("108369006", "SCT", "Neoplasm"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i in range(len(masks))
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=stack.astype(bool),
        segmentation_type="BINARY",
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=99,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
    )
    if reverse_frames:  # highest segment first, slices descending: "last write wins" would fail
        frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
        seg.PixelData = pack_bits(frames[::-1])
        seg.PerFrameFunctionalGroupsSequence = list(seg.PerFrameFunctionalGroupsSequence)[::-1]
    seg.save_as(path)
    return path


@pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name")
@pytest.mark.parametrize("reverse_frames", [False, True])
def test_overlapping_segments_higher_number_wins(
    dataset: Dataset, first_run: tuple, reverse_frames: bool, tmp_path: Path
) -> None:
    _, out = first_run
    study, truth = dataset.good["oblique"]
    t = truth["label"]
    # overlapping segments: 1 covers the whole tumour, 2 and 3 lie inside it and must win
    seg_path = seg_from_masks(
        study, [t > 0, t == 2, t == 3], tmp_path / "seg.dcm", reverse_frames=reverse_frames
    )
    image = nib.load(out / case_key_for(study.name) / "image.nii.gz")
    sources = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in find_series(study, description="T1c").iterdir()
    }
    for_uid = str(pydicom.dcmread(seg_path, stop_before_pixels=True).FrameOfReferenceUID)
    label = seg_label_map(
        seg_path,
        image.affine,
        image.shape[:3],
        frame_of_reference_uid=for_uid,
        source_sop_instance_uids=sources,
    )
    np.testing.assert_array_equal(label[truth_in_nifti_grid(truth, image.affine)], t)

    ds = pydicom.dcmread(seg_path)  # half a pixel off the grid
    spacing = float(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[1])
    for item in ds.PerFrameFunctionalGroupsSequence:
        plane = item.PlanePositionSequence[0]
        plane.ImagePositionPatient = list(
            np.array(plane.ImagePositionPatient, float) + 0.5 * spacing * truth["row_cosine"]
        )
    ds.save_as(seg_path)
    with pytest.raises(SegRejected, match="not on the image grid"):
        seg_label_map(
            seg_path,
            image.affine,
            image.shape[:3],
            frame_of_reference_uid=for_uid,
            source_sop_instance_uids=sources,
        )


def test_corruption_kinds_are_all_exercised() -> None:
    assert set(CORRUPTIONS) | {"missing_edge_slice"} == set(EXPECTED_REASONS)
