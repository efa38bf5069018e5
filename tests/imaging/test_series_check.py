"""Series folder validation on a synthetic case in the fetch-cache layout, good and damaged."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from jipfed.imaging.series_check import SeriesRejected, check_series
from jipfed.imaging.synth import default_site_profiles, write_dataset
from jipfed.testing.corrupt import (
    GRAYSCALE_SOFTCOPY_PS,
    fetch_layout,
    find_series,
    missing_slice,
    mixed_orientation,
    non_image_instance,
    slices_along_normal,
    unreadable_file,
)

SHAPE = (20, 16, 10)  # rows, cols, slices


@pytest.fixture(scope="module")
def synth_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """One oblique synthetic case: its study folder (UID layout) and ground truth."""
    root = tmp_path_factory.mktemp("series-check")
    (profile,) = default_site_profiles(1, 1, orientations=["oblique"])
    write_dataset(root / "synth", [profile], shape=SHAPE, seed=3, progress=False)
    case_dir = next((root / "synth" / profile.site_id / "dicom").iterdir())
    truth = dict(np.load(root / "synth" / profile.site_id / "truth" / f"{case_dir.name}.npz"))
    return fetch_layout(case_dir, root / "dicom"), truth


@pytest.fixture()
def study(synth_case: tuple[Path, dict], tmp_path: Path) -> Path:
    """A private copy of the good study folder, free to damage."""
    return Path(shutil.copytree(synth_case[0], tmp_path / synth_case[0].name))


def rejection(folder: Path) -> str:
    with pytest.raises(SeriesRejected) as info:
        check_series(folder)
    assert info.value.folder == folder
    return info.value.reason


def test_good_series_geometry_matches_truth(synth_case: tuple[Path, dict]) -> None:
    study_dir, truth = synth_case
    flair = find_series(study_dir, description="FLAIR")
    info = check_series(flair)
    geometry = info.geometry
    assert geometry is not None
    assert (info.modality, info.description, info.n_slices) == ("MR", "FLAIR", SHAPE[2])
    assert info.series_uid == flair.name and info.study_uid == study_dir.name
    assert (geometry.rows, geometry.columns, geometry.n_slices) == SHAPE
    np.testing.assert_allclose(geometry.orientation, [*truth["row_cosine"], *truth["col_cosine"]], atol=1e-6)
    np.testing.assert_allclose(geometry.pixel_spacing, truth["pixel_spacing"], atol=1e-6)
    np.testing.assert_allclose(geometry.slice_spacing, truth["slice_spacing"], atol=1e-4)
    np.testing.assert_allclose(geometry.origin, truth["origin"], atol=1e-4)
    np.testing.assert_allclose(geometry.normal, truth["normal"], atol=1e-6)
    # voxel (column 3, row 2, slice 4) lands where the truth geometry puts it
    expected = (
        truth["origin"]
        + 3 * truth["pixel_spacing"][1] * truth["row_cosine"]
        + 2 * truth["pixel_spacing"][0] * truth["col_cosine"]
        + 4 * truth["slice_spacing"] * truth["normal"]
    )
    np.testing.assert_allclose(geometry.affine_lps() @ [3, 2, 4, 1], [*expected, 1], atol=1e-4)


def test_files_sorted_along_normal_whatever_their_names(study: Path) -> None:
    flair = find_series(study, description="FLAIR")
    ordered = slices_along_normal(flair)
    for i, path in enumerate(ordered):  # reverse the name order
        path.rename(flair / f"x{len(ordered) - i:04d}.dcm")
    info = check_series(flair)
    positions = [
        np.array(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient, float)
        @ info.geometry.normal
        for p in info.files
    ]
    assert np.all(np.diff(positions) > 0)
    assert info.files[0].name == f"x{len(ordered):04d}.dcm"


def test_seg_series_is_recognised(study: Path) -> None:
    info = check_series(find_series(study, modality="SEG"))
    assert info.is_segmentation and info.geometry is None and info.n_slices == 1
    assert info.frame_of_reference_uid == check_series(find_series(study)).frame_of_reference_uid


def test_missing_middle_slice(study: Path) -> None:
    assert "missing slice" in rejection(missing_slice(study))


def test_mixed_orientation(study: Path) -> None:
    assert "mixed ImageOrientationPatient" in rejection(mixed_orientation(study))


@pytest.mark.parametrize(("sop_class", "name"), [(None, "Basic Text SR"), (GRAYSCALE_SOFTCOPY_PS, "Presentation")])
def test_non_image_instance_among_slices_is_left_out(study: Path, sop_class: str | None, name: str) -> None:
    kwargs = {} if sop_class is None else {"sop_class_uid": sop_class}
    folder = non_image_instance(study, **kwargs)
    info = check_series(folder)
    assert info.n_slices == SHAPE[2] and len(info.files) == SHAPE[2]
    ((file_name, reason),) = info.left_out
    assert file_name.startswith("zz_") and file_name not in {p.name for p in info.files}
    assert name in reason and f"left out of {info.label}" in reason
    assert re.fullmatch(r'series \d+ "(FLAIR|T1|T1c|T2)"', info.label)


def test_series_of_a_non_image_storage_class(study: Path) -> None:
    flair = find_series(study, description="FLAIR")
    for path in flair.iterdir():
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = (
            "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
        )
        ds.save_as(path)
    reason = rejection(flair)
    assert re.match(r'series \d+ "FLAIR": no MR/CT image instances', reason) and "Secondary Capture" in reason


@pytest.mark.parametrize(("mode", "expected"), [("truncate", "truncated"), ("garbage", "unreadable")])
def test_unreadable_file(study: Path, mode: str, expected: str) -> None:
    assert expected in rejection(unreadable_file(study, mode=mode))


def test_truncated_inside_pixel_data(study: Path) -> None:
    path = slices_along_normal(find_series(study))[0]
    path.write_bytes(path.read_bytes()[:-100])
    assert "truncated pixel data" in rejection(path.parent)


def test_mixed_series_uid(study: Path) -> None:
    flair, t2 = find_series(study, description="FLAIR"), find_series(study, description="T2")
    shutil.copy(slices_along_normal(t2)[0], flair / "stray.dcm")
    assert "mixed or missing SeriesInstanceUID" in rejection(flair)


@pytest.mark.parametrize("keyword", ["PixelSpacing", "Rows"])
def test_inconsistent_slice_size(study: Path, keyword: str) -> None:
    flair = find_series(study, description="FLAIR")
    path = slices_along_normal(flair)[3]
    ds = pydicom.dcmread(path)
    if keyword == "Rows":
        ds.Rows, ds.PixelData = ds.Rows - 1, ds.PixelData[: (ds.Rows - 1) * ds.Columns * 2]
    else:
        ds.PixelSpacing = [float(v) * 1.1 for v in ds.PixelSpacing]
    ds.save_as(path)
    assert "inconsistent Rows/Columns/PixelSpacing" in rejection(flair)


def test_irregular_spacing_and_in_plane_shift(study: Path) -> None:
    flair = find_series(study, description="FLAIR")
    path = slices_along_normal(flair)[4]
    ds = pydicom.dcmread(path)
    original = np.array(ds.ImagePositionPatient, float)
    iop = np.array(ds.ImageOrientationPatient, float)
    ds.ImagePositionPatient = list(original + 0.3 * np.cross(iop[:3], iop[3:]))
    ds.save_as(path)
    assert "irregular slice spacing" in rejection(flair)
    ds.ImagePositionPatient = list(original + 0.5 * iop[:3])
    ds.save_as(path)
    assert "not stacked along the slice normal" in rejection(flair)


def test_empty_folder(tmp_path: Path) -> None:
    assert rejection(tmp_path) == "no files"
