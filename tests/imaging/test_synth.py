"""Tests of the synthetic BraTS-like DICOM data set (jipfed.imaging.synth, ``jipfed synth``)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import MRImageStorage, SegmentationStorage

from jipfed.cli import main
from jipfed.imaging.synth import (
    CHANNELS,
    DatasetManifest,
    SiteProfile,
    default_site_profiles,
    generate_case,
    write_case,
    write_dataset,
)
from jipfed.imaging.synth.geometry import orientation_cosines
from jipfed.imaging.synth.mr_series import (
    VARYING_TAGS,
    build_mr_series,
    file_meta_template,
    series_header,
    slice_elements,
    study_uids,
)
from jipfed.imaging.synth.stack_writer import StackEncoder

SMALL = (32, 32, 16)  # rows, cols, slices: enough anatomy, fast I/O
SEED = 3


def _profiles() -> list[SiteProfile]:
    """Three small sites: axial (2 cases, mostly HGG), sagittal, oblique with signed pixels."""
    return [
        SiteProfile("site-a", 2, hgg_fraction=1.0, pixel_spacing_mm=(4.0, 4.0), slice_thickness_mm=6.0),
        SiteProfile(
            "site-b",
            1,
            orientation="sagittal",
            hgg_fraction=1.0,
            pixel_spacing_mm=(4.0, 4.5),
            slice_thickness_mm=7.0,
        ),
        SiteProfile(
            "site-c",
            1,
            orientation="oblique",
            hgg_fraction=0.0,
            pixel_spacing_mm=(4.2, 4.2),
            slice_thickness_mm=6.5,
            pixel_signed=True,
        ),
    ]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> DatasetManifest:
    out = tmp_path_factory.mktemp("synth")
    return write_dataset(
        out, _profiles(), shape=SMALL, seed=SEED, study_description="SYNTH-TEST", progress=False
    )


def _cases(manifest: DatasetManifest) -> list[tuple[SiteProfile, Path, Path]]:
    """(profile, case DICOM folder, truth file) of every written case."""
    return [
        (
            site.profile,
            manifest.out_dir / site.site_id / "dicom" / case.case_id,
            manifest.out_dir / site.site_id / "truth" / f"{case.case_id}.npz",
        )
        for site in manifest.sites
        for case in site.cases
    ]


def _series(case_dir: Path, name: str) -> list[pydicom.Dataset]:
    """A series' instances sorted by InstanceNumber."""
    datasets = [pydicom.dcmread(p) for p in sorted((case_dir / name).glob("*.dcm"))]
    return sorted(datasets, key=lambda ds: int(ds.InstanceNumber))


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_headers_and_sop_classes(written: DatasetManifest) -> None:
    manifest_json = json.loads((written.out_dir / "dataset.json").read_text())
    assert [s["site_id"] for s in manifest_json["sites"]] == ["site-a", "site-b", "site-c"]
    assert manifest_json["seed"] == SEED and manifest_json["shape"] == list(SMALL)
    for site in written.sites:
        for entry in site.cases:
            case_dir = written.out_dir / site.site_id / "dicom" / entry.case_id
            assert sorted(p.name for p in case_dir.iterdir()) == sorted([*CHANNELS, "SEG"])
            truth = np.load(written.out_dir / site.site_id / "truth" / f"{entry.case_id}.npz")
            assert str(truth["grade"]) == entry.grade
            for name in CHANNELS:
                series = _series(case_dir, name)
                assert [p.name for p in sorted((case_dir / name).iterdir())] == [
                    f"{k:04d}.dcm" for k in range(1, SMALL[2] + 1)
                ]
                ds = series[0]
                assert (
                    ds.SOPClassUID == MRImageStorage
                    and ds.file_meta.MediaStorageSOPClassUID == MRImageStorage
                )
                assert ds.Modality == "MR" and ds.SeriesDescription == name
                assert ds.SeriesInstanceUID == entry.series_uids[name]
                assert ds.StudyInstanceUID == entry.study_instance_uid
                assert ds.PatientID == entry.case_id == str(ds.PatientName)
                assert entry.case_id.startswith(f"SYN-{site.site_id}-")
                assert ds.StudyDescription == "SYNTH-TEST"
                assert ds.AdmittingDiagnosesDescription == entry.grade
                assert ds.Manufacturer == site.profile.manufacturer
                assert float(ds.MagneticFieldStrength) == site.profile.field_strength_t
                assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (SMALL[0], SMALL[1], 16)
                assert ds.PixelRepresentation == int(site.profile.pixel_signed)
                assert float(ds.WindowWidth) > 0
                assert [int(s.InstanceNumber) for s in series] == list(range(1, SMALL[2] + 1))
                assert len({s.SOPInstanceUID for s in series}) == SMALL[2]
            (seg_file,) = (case_dir / "SEG").iterdir()
            seg = pydicom.dcmread(seg_file)
            assert seg.SOPClassUID == SegmentationStorage and seg.Modality == "SEG"
            assert seg.SeriesDescription == "Tumor segmentation" and seg.SegmentationType == "BINARY"
            assert seg.StudyInstanceUID == entry.study_instance_uid
            assert seg.AdmittingDiagnosesDescription == entry.grade
    uids = [
        u for s in written.sites for c in s.cases for u in (c.study_instance_uid, *c.series_uids.values())
    ]
    assert len(uids) == len(set(uids))


def test_dcmdump_reads_mr_and_seg(written: DatasetManifest) -> None:
    dcmdump = shutil.which("dcmdump")
    if dcmdump is None:
        pytest.fail("dcmdump (dcmtk) is not installed")
    _, case_dir, _ = _cases(written)[0]
    for path, sop_class in (
        (case_dir / "T1c" / "0001.dcm", "MRImageStorage"),
        (case_dir / "SEG" / "0001.dcm", "SegmentationStorage"),
    ):
        result = subprocess.run([dcmdump, str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert sop_class in result.stdout and case_dir.name in result.stdout
        assert "E: " not in result.stderr and "W: " not in result.stderr, result.stderr


def test_series_share_geometry_and_positions_follow_orientation(written: DatasetManifest) -> None:
    for profile, case_dir, truth_file in _cases(written):
        truth = np.load(truth_file)
        normal = np.cross(truth["row_cosine"], truth["col_cosine"])
        np.testing.assert_allclose(truth["normal"], normal, atol=1e-9)
        expected_row, expected_col = orientation_cosines(profile.orientation)
        np.testing.assert_allclose(truth["row_cosine"], expected_row, atol=1e-9)
        np.testing.assert_allclose(truth["col_cosine"], expected_col, atol=1e-9)
        reference = None
        for name in CHANNELS:
            series = _series(case_dir, name)
            geometry = {
                "iop": {tuple(float(v) for v in ds.ImageOrientationPatient) for ds in series},
                "spacing": {tuple(float(v) for v in ds.PixelSpacing) for ds in series},
                "thickness": {(float(ds.SliceThickness), float(ds.SpacingBetweenSlices)) for ds in series},
                "for": {ds.FrameOfReferenceUID for ds in series},
                "ipp": [tuple(float(v) for v in ds.ImagePositionPatient) for ds in series],
            }
            assert all(len(geometry[k]) == 1 for k in ("iop", "spacing", "thickness", "for")), name
            if reference is None:
                reference = geometry
            assert geometry == reference, f"{case_dir.name}: {name} differs from {CHANNELS[0]}"
        (iop,) = reference["iop"]
        np.testing.assert_allclose(iop, [*truth["row_cosine"], *truth["col_cosine"]], atol=1e-9)
        assert reference["spacing"] == {profile.pixel_spacing_mm}
        assert reference["thickness"] == {(profile.slice_thickness_mm, profile.slice_thickness_mm)}
        positions = np.array(reference["ipp"])
        k = np.arange(len(positions))[:, None]
        np.testing.assert_allclose(
            positions, truth["origin"] + k * float(truth["slice_spacing"]) * normal, atol=1e-4
        )
        steps = np.diff(positions, axis=0)
        np.testing.assert_allclose(
            steps, np.broadcast_to(profile.slice_thickness_mm * normal, steps.shape), atol=1e-4
        )


def test_stored_pixels_equal_truth(written: DatasetManifest) -> None:
    for profile, case_dir, truth_file in _cases(written):
        truth = np.load(truth_file)
        assert truth["images"].shape == (4, SMALL[2], SMALL[0], SMALL[1])
        assert truth["images"].dtype == (np.int16 if profile.pixel_signed else np.uint16)
        assert tuple(str(c) for c in truth["channels"]) == CHANNELS
        for channel, name in enumerate(CHANNELS):
            stored = np.stack([ds.pixel_array for ds in _series(case_dir, name)])
            assert stored.dtype == truth["images"].dtype
            np.testing.assert_array_equal(stored, truth["images"][channel])
            assert stored.max() > 0 and (stored == 0).any()  # a head in a zero background


def test_seg_segments_and_references(written: DatasetManifest) -> None:
    for _, case_dir, _ in _cases(written):
        seg = pydicom.dcmread(case_dir / "SEG" / "0001.dcm")
        source = _series(case_dir, "T1c")
        numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence]
        labels = [str(item.SegmentLabel).lower() for item in seg.SegmentSequence]
        assert numbers == [1, 2, 3]
        assert "core" in labels[0] and "edema" in labels[1] and "enhancing" in labels[2]
        assert all(item.SegmentAlgorithmType == "MANUAL" for item in seg.SegmentSequence)
        (referenced_series,) = seg.ReferencedSeriesSequence
        assert referenced_series.SeriesInstanceUID == source[0].SeriesInstanceUID
        referenced = {item.ReferencedSOPInstanceUID for item in referenced_series.ReferencedInstanceSequence}
        assert referenced == {ds.SOPInstanceUID for ds in source}
        assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
        by_uid = {ds.SOPInstanceUID: ds for ds in source}
        for frame in seg.PerFrameFunctionalGroupsSequence:
            (derivation,) = frame.DerivationImageSequence
            (source_image,) = derivation.SourceImageSequence
            image = by_uid[source_image.ReferencedSOPInstanceUID]
            position = frame.PlanePositionSequence[0].ImagePositionPatient
            np.testing.assert_allclose(
                [float(v) for v in position], [float(v) for v in image.ImagePositionPatient], atol=1e-4
            )


def test_seg_read_back_equals_truth(written: DatasetManifest) -> None:
    grades = set()
    for _, case_dir, truth_file in _cases(written):
        truth = np.load(truth_file)
        seg = hd.seg.segread(case_dir / "SEG" / "0001.dcm")
        source_uids = [ds.SOPInstanceUID for ds in _series(case_dir, "T1c")]
        masks = seg.get_pixels_by_source_instance(
            source_uids, segment_numbers=[1, 2, 3], assert_missing_frames_are_empty=True
        )
        assert masks.shape == (*truth["label"].shape, 3)
        for index, value in enumerate((1, 2, 3)):
            np.testing.assert_array_equal(masks[..., index].astype(bool), truth["label"] == value)
        grades.add(str(truth["grade"]))
    assert grades == {"HGG", "LGG"}


def test_same_seed_writes_identical_bytes_other_seed_differs(tmp_path: Path) -> None:
    profiles = [SiteProfile("site-a", 1, pixel_spacing_mm=(4.0, 4.0), slice_thickness_mm=6.0)]
    shape = (24, 24, 12)
    first = write_dataset(tmp_path / "one", profiles, shape=shape, seed=7, progress=False)
    write_dataset(tmp_path / "two", profiles, shape=shape, seed=7, progress=False)
    other = write_dataset(tmp_path / "three", profiles, shape=shape, seed=8, progress=False)
    digest_one = _tree_digest(tmp_path / "one")
    assert len(digest_one) == 4 * 12 + 1 + 1 + 1  # MR slices, SEG, truth, manifest
    assert digest_one == _tree_digest(tmp_path / "two")
    one = np.load(tmp_path / "one" / "site-a" / "truth" / "SYN-site-a-000.npz")
    three = np.load(tmp_path / "three" / "site-a" / "truth" / "SYN-site-a-000.npz")
    assert not np.array_equal(one["images"], three["images"])
    assert first.sites[0].cases[0].study_instance_uid != other.sites[0].cases[0].study_instance_uid
    assert first.sites[0].cases[0].series_uids["T1"] != other.sites[0].cases[0].series_uids["T1"]


def test_adding_cases_and_sites_keeps_earlier_cases(tmp_path: Path) -> None:
    base = SiteProfile("site-a", 2, pixel_spacing_mm=(4.0, 4.0), slice_thickness_mm=6.0)
    shape = (24, 24, 12)
    write_dataset(tmp_path / "small", [base], shape=shape, seed=1, progress=False)
    extra = SiteProfile("site-b", 1, pixel_spacing_mm=(4.0, 4.0), slice_thickness_mm=6.0)
    write_dataset(tmp_path / "large", [replace(base, n_cases=3), extra], shape=shape, seed=1, progress=False)
    for case in ("SYN-site-a-000", "SYN-site-a-001"):
        assert _tree_digest(tmp_path / "small" / "site-a" / "dicom" / case) == _tree_digest(
            tmp_path / "large" / "site-a" / "dicom" / case
        )
    assert (tmp_path / "large" / "site-a" / "dicom" / "SYN-site-a-002").is_dir()
    loaded = DatasetManifest.load(tmp_path / "large")
    assert [len(s.cases) for s in loaded.sites] == [3, 1]
    assert loaded.sites[0].profile == replace(base, n_cases=3)


def test_stack_encoder_bytes_equal_pydicom(written: DatasetManifest) -> None:
    case = generate_case(_profiles()[2], 0, shape=(16, 16, 8), seed=SEED)
    uids = study_uids(case)
    full = build_mr_series(case, "FLAIR", uids, "X")
    encoder = StackEncoder(series_header(case, "FLAIR", uids, "X"), VARYING_TAGS, file_meta_template())
    for ds, varying in zip(full, slice_elements(case, "FLAIR"), strict=True):
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        assert encoder.encode(varying) == buffer.getvalue()


def _head_median(profile: SiteProfile, index: int = 0) -> float:
    case = generate_case(profile, index, shape=SMALL, seed=SEED)
    t1 = case.images[CHANNELS.index("T1")]
    return float(np.median(t1[t1 > 0]))


def test_heterogeneity_switches_have_measurable_effects() -> None:
    base = SiteProfile("site-x", 1, pixel_spacing_mm=(4.0, 4.0), slice_thickness_mm=6.0)
    ratio = _head_median(replace(base, intensity_scale=2000.0)) / _head_median(
        replace(base, intensity_scale=500.0)
    )
    assert 3.5 < ratio < 4.5

    small = generate_case(replace(base, tumour_radius_mm=(5.0, 6.0)), 0, shape=SMALL, seed=SEED)
    large = generate_case(replace(base, tumour_radius_mm=(16.0, 18.0)), 0, shape=SMALL, seed=SEED)
    voxel_mm3 = 4.0 * 4.0 * 6.0
    assert (large.label > 0).sum() * voxel_mm3 > 3 * (small.label > 0).sum() * voxel_mm3

    # Same anatomy in mm (the field of view holds the whole head in both), sampled more coarsely.
    fine_profile = replace(base, pixel_spacing_mm=(4.4, 4.4))
    coarse_profile = replace(base, pixel_spacing_mm=(5.0, 5.0))
    fine = generate_case(fine_profile, 0, shape=SMALL, seed=SEED).images[1] > 0
    coarse = generate_case(coarse_profile, 0, shape=SMALL, seed=SEED).images[1] > 0
    assert fine.sum() > 1.15 * coarse.sum()
    assert abs(fine.sum() * 4.4**2 / (coarse.sum() * 5.0**2) - 1) < 0.1

    def roughness(profile: SiteProfile) -> float:
        image = generate_case(profile, 0, shape=SMALL, seed=SEED).images[1].astype(float)
        head = image > 0
        return float(
            np.abs(np.diff(image, axis=2))[head[:, :, 1:] & head[:, :, :-1]].mean() / image[head].mean()
        )

    assert roughness(replace(base, noise_level=0.12)) > 1.5 * roughness(replace(base, noise_level=0.01))

    for fraction, grade in ((0.0, "LGG"), (1.0, "HGG")):
        profile = replace(base, n_cases=4, hgg_fraction=fraction)
        assert {generate_case(profile, i, shape=(16, 16, 8), seed=SEED).grade for i in range(4)} == {grade}


def test_default_profiles_are_heterogeneous_or_homogeneous() -> None:
    hetero = default_site_profiles(4, 8)
    assert [p.site_id for p in hetero] == ["site-a", "site-b", "site-c", "site-d"]
    assert sum(p.n_cases for p in hetero) == 32 and len({p.n_cases for p in hetero}) > 1
    for field in (
        "intensity_scale",
        "pixel_spacing_mm",
        "slice_thickness_mm",
        "tumour_radius_mm",
        "hgg_fraction",
    ):
        assert len({getattr(p, field) for p in hetero}) == 4, field
    homo = default_site_profiles(3, 5, heterogeneous=False)
    assert [p.n_cases for p in homo] == [5, 5, 5]
    assert len({replace(p, site_id="site-z") for p in homo}) == 1
    mixed = default_site_profiles(3, 2, orientations=["axial", "sagittal", "oblique"])
    assert [p.orientation for p in mixed] == ["axial", "sagittal", "oblique"]


@pytest.mark.parametrize(
    "changes",
    [
        {"site_id": "Site A"},
        {"n_cases": 0},
        {"intensity_scale": -1.0},
        {"noise_level": float("nan")},
        {"pixel_spacing_mm": (2.0,)},
        {"orientation": "diagonal"},
        {"tumour_radius_mm": (10.0, 5.0)},
        {"hgg_fraction": 1.5},
        {"enhancing_fraction": (0.0, 0.5)},
        {"intensity_scale": 30000.0},
    ],
)
def test_site_profile_rejects_bad_values(changes: dict) -> None:
    fields = {"site_id": "site-a", "n_cases": 1, **changes}
    with pytest.raises(ValueError):
        SiteProfile(**fields)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


@pytest.fixture(scope="module")
def default_size_cases() -> list:
    """Eight cases at the default size from two heterogeneous sites (no I/O)."""
    profiles = default_site_profiles(2, 8)
    return [generate_case(p, i, seed=0) for p in profiles for i in range(4)]


def test_label_balance(default_size_cases: list) -> None:
    hgg = [c for c in default_size_cases if c.grade == "HGG"]
    lgg = [c for c in default_size_cases if c.grade == "LGG"]
    assert hgg and lgg
    for case in default_size_cases:
        head = case.images[1] > 0
        counts = {v: int((case.label == v).sum()) for v in (1, 2, 3)}
        whole = sum(counts.values())
        assert 0.003 < whole / head.sum() < 0.4, (case.case_id, whole, head.sum())
        assert counts[1] > 0 and counts[2] > 0, case.case_id
        if case.grade == "HGG":
            assert counts[3] > 0, case.case_id
        else:
            assert counts[3] < 0.15 * (counts[1] + counts[3]), case.case_id
        assert not (case.label > 0)[~head].any()
    assert _enhancing_share(hgg) > 3 * _enhancing_share(lgg)


def _enhancing_share(cases: list) -> float:
    return float(np.mean([(c.label == 3).sum() / max((c.label > 0).sum(), 1) for c in cases]))


def test_single_channel_threshold_does_not_solve_whole_tumour(default_size_cases: list) -> None:
    """Best global threshold per channel (z-scored in the head) stays far from a perfect Dice,
    while the lesion is still visible (FLAIR brighter in the tumour than in the rest of the head)."""
    thresholds = np.linspace(-1.5, 4.0, 23)
    best = {}
    for channel, name in enumerate(CHANNELS):
        scores = np.zeros((len(default_size_cases), len(thresholds), 2))
        for i, case in enumerate(default_size_cases):
            image = case.images[channel].astype(float)
            head = image > 0
            z = (image - image[head].mean()) / image[head].std()
            whole = case.label > 0
            for j, t in enumerate(thresholds):
                scores[i, j, 0] = _dice((z > t) & head, whole)
                scores[i, j, 1] = _dice((z < -t) & head, whole)
        best[name] = float(scores.mean(axis=0).max())
    assert max(best.values()) < 0.75, best
    flair = CHANNELS.index("FLAIR")
    for case in default_size_cases:
        image = case.images[flair].astype(float)
        edema = case.label == 2
        rest = (image > 0) & (case.label == 0)
        assert image[edema].mean() > image[rest].mean(), case.case_id


def test_write_case_replaces_existing_case(tmp_path: Path) -> None:
    profile = SiteProfile("site-a", 1, pixel_spacing_mm=(4.0, 4.0), slice_thickness_mm=6.0)
    case = generate_case(profile, 0, shape=(16, 16, 8), seed=SEED)
    folder = write_case(case, tmp_path / "site-a", study_description="FIRST")
    (folder / "T1" / "stray.dcm").write_bytes(b"junk")
    again = write_case(case, tmp_path / "site-a", study_description="SECOND")
    assert again == folder == tmp_path / "site-a" / "dicom" / "SYN-site-a-000"
    assert not (folder / "T1" / "stray.dcm").exists()
    assert pydicom.dcmread(folder / "T1" / "0001.dcm").StudyDescription == "SECOND"
    assert sorted(p.name for p in (tmp_path / "site-a" / "dicom").iterdir()) == ["SYN-site-a-000"]
    with pytest.raises(ValueError):
        write_case(case, tmp_path / "site-a", study_description="")


def test_cli_writes_data_set(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    argv = [
        "synth",
        "--out",
        str(out),
        "--sites",
        "2",
        "--cases",
        "1",
        "--size",
        "16",
        "16",
        "8",
        "--seed",
        "5",
        "--homogeneous",
        "--orientation",
        "mixed",
        "--study-description",
        "CLI-SET",
        "--no-progress",
    ]
    assert main(argv) == 0
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["seed"] == 5 and manifest["shape"] == [16, 16, 8]
    assert [s["site_id"] for s in manifest["sites"]] == ["site-a", "site-b"]
    assert [s["profile"]["orientation"] for s in manifest["sites"]] == ["axial", "sagittal"]
    ds = pydicom.dcmread(out / "site-b" / "dicom" / "SYN-site-b-000" / "FLAIR" / "0001.dcm")
    assert ds.StudyDescription == "CLI-SET" and ds.SeriesDescription == "FLAIR"
    assert [float(v) for v in ds.ImageOrientationPatient] == [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    assert main(["synth", "--out", str(tmp_path / "bad"), "--size", "4", "16", "8", "--no-progress"]) == 2
    assert main(["synth", "--out", str(tmp_path / "bad"), "--seed", "-1", "--no-progress"]) == 2
