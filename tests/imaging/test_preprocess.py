"""Preprocessing: geometry (RAS, spacing, size), labels, normalisation and the on-disk cache."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from jipfed.imaging.preprocess import (
    CHANNELS,
    PreprocessConfig,
    load_index,
    preprocess_cases,
)

SHAPE = (24, 20, 12)  # voxels along the stored axes
# LPS-like storage: i runs to the patient's left, j to posterior; anisotropic 2 x 2.5 x 3 mm voxels
LPS_AFFINE = np.array(
    [[-2.0, 0.0, 0.0, 30.0], [0.0, -2.5, 0.0, 20.0], [0.0, 0.0, 3.0, -15.0], [0.0, 0.0, 0.0, 1.0]]
)
# the same geometry with the first two stored axes swapped (j -> x, i -> y), as in a transposed read
SWAPPED_AFFINE = np.array(
    [[0.0, -2.0, 0.0, 30.0], [-2.5, 0.0, 0.0, 20.0], [0.0, 0.0, 3.0, -15.0], [0.0, 0.0, 0.0, 1.0]]
)
CONFIG = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), spatial_size=(32, 32, 24))


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def make_arrays(
    seed: int, shape: tuple[int, int, int] = SHAPE, blob: tuple[int, int, int] = (5, 5, 8)
) -> tuple[np.ndarray, np.ndarray]:
    """A head (ellipsoid, intensities ~100) holding a nested tumour around voxel ``blob``.

    Returns image (X, Y, Z, 4) float32, background exactly 0, and label (X, Y, Z) uint8 with
    2 (oedema) ⊃ 1 (core) ⊃ 3 (enhancing). Tumour contrast grows with the channel index.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    centre = (np.array(shape) - 1) / 2
    head = (((grid - centre) / (np.array(shape) * 0.45)) ** 2).sum(-1) <= 1
    dist = np.linalg.norm(grid - np.array(blob), axis=-1)
    label = np.zeros(shape, np.uint8)
    label[dist <= 3.0] = 2
    label[dist <= 2.0] = 1
    label[dist <= 1.0] = 3
    label[~head] = 0
    image = rng.normal(100.0, 5.0, size=(*shape, len(CHANNELS)))
    for c in range(len(CHANNELS)):
        image[..., c] += 20.0 * (c + 1) * (label > 0)
    image[~head] = 0.0
    return image.astype(np.float32), label


def write_case(
    nifti_root: Path,
    key: str,
    *,
    seed: int = 0,
    content_hash: str | None = None,
    affine: np.ndarray = LPS_AFFINE,
    label: np.ndarray | None = None,
    channels: list[str] | None = None,
) -> Path:
    """Write a converted case folder (image.nii.gz, label.nii.gz, case.json) and return it."""
    image, default_label = make_arrays(seed)
    label = default_label if label is None else label
    case_dir = nifti_root / key
    case_dir.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), case_dir / "image.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), case_dir / "label.nii.gz")
    meta = {
        "case_key": key,
        "channels": list(CHANNELS) if channels is None else channels,
        "grade": "HGG" if seed % 2 == 0 else "LGG",
        "content_hash": content_hash or f"hash-{key}-{seed}",
    }
    (case_dir / "case.json").write_text(json.dumps(meta))
    return case_dir


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Centroid of a boolean mask in world mm."""
    return nib.affines.apply_affine(affine, np.argwhere(mask).mean(0))


@pytest.mark.parametrize("affine", [LPS_AFFINE, SWAPPED_AFFINE], ids=["lps", "swapped"])
def test_output_shape_orientation_and_labels(tmp_path: Path, affine: np.ndarray) -> None:
    case_dir = write_case(tmp_path / "nifti", "case0001", affine=affine)
    report = preprocess_cases([case_dir], tmp_path / "cache", CONFIG, progress=False)
    assert (report.processed, report.cached, report.failed) == (1, 0, [])
    out = load_npz(report.out_dir / "case0001.npz")

    assert out["image"].shape == (4, 32, 32, 24) and out["image"].dtype == np.float32
    assert out["label"].shape == (1, 32, 32, 24) and out["label"].dtype == np.uint8
    assert nib.aff2axcodes(out["affine"]) == ("R", "A", "S")
    np.testing.assert_allclose(nib.affines.voxel_sizes(out["affine"]), (2.0, 2.0, 2.0))

    _, label_in = make_arrays(0)
    label_out = out["label"][0]
    # nearest-neighbour resampling keeps exactly the label values
    assert set(np.unique(label_out)) == {0, 1, 2, 3}
    # the tumour sits where it was in the world (within one output voxel) ...
    np.testing.assert_allclose(
        world_centroid(label_out > 0, out["affine"]), world_centroid(label_in > 0, affine), atol=2.0
    )
    # ... which for this storage is the right-anterior-superior part of the head: high indices
    # on every RAS axis (the input had it at low i and j, i.e. left-posterior in storage order)
    head = np.argwhere(out["image"][0] != 0)
    tumour = np.argwhere(label_out > 0).mean(0)
    assert (tumour > (head.min(0) + head.max(0)) / 2).all()
    # volumes survive resampling (2.5 / 3 mm -> 2 mm nearest) within a coarse tolerance
    for value in (1, 2, 3):
        vol_in = (label_in == value).sum() * np.prod(nib.affines.voxel_sizes(affine))
        vol_out = (label_out == value).sum() * 8.0
        assert vol_out == pytest.approx(vol_in, rel=0.5), value
    # the label stays on the head (same grid as the image)
    assert (out["image"][:, label_out > 0] != 0).all()


def test_crop_that_cuts_the_tumour_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    case_dir = write_case(tmp_path / "nifti", "case0001")
    with caplog.at_level(logging.WARNING, logger="jipfed.imaging.preprocess"):
        preprocess_cases([case_dir], tmp_path / "cache", CONFIG, progress=False)
        assert "removed" not in caplog.text
        small = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), spatial_size=(8, 8, 8))
        report = preprocess_cases([case_dir], tmp_path / "cache", small, progress=False)
    assert report.processed == 1  # still usable, but the site is told
    assert "case case0001: cropping to (8, 8, 8) removed" in caplog.text


def test_normalisation_and_channel_order(tmp_path: Path) -> None:
    case_dir = write_case(tmp_path / "nifti", "case0001")
    report = preprocess_cases([case_dir], tmp_path / "cache", CONFIG, progress=False)
    out = load_npz(report.out_dir / "case0001.npz")
    image, label = out["image"], out["label"][0]
    assert (image == 0).any(), "padding / background must stay 0"
    tumour_means = []
    for c in range(image.shape[0]):
        values = image[c][image[c] != 0]
        assert abs(values.mean()) < 1e-3
        assert values.std() == pytest.approx(1.0, abs=1e-2)
        tumour_means.append(image[c][label > 0].mean())
    # tumour contrast was made to grow with the channel index: order FLAIR, T1, T1c, T2 is kept
    assert np.all(np.diff(tumour_means) > 0), tumour_means


def test_cache_reuse_and_incremental_updates(tmp_path: Path) -> None:
    nifti, cache = tmp_path / "nifti", tmp_path / "cache"
    dirs = [write_case(nifti, f"case000{i}", seed=i) for i in range(3)]

    first = preprocess_cases(dirs, cache, CONFIG, progress=False)
    assert (first.processed, first.cached, first.failed) == (3, 0, [])
    assert first.out_dir == cache / CONFIG.config_hash()
    index = load_index(first.out_dir)
    assert [e["case_key"] for e in index] == ["case0000", "case0001", "case0002"]
    assert index[1] == {
        "case_key": "case0001",
        "file": "case0001.npz",
        "grade": "LGG",
        "content_hash": "hash-case0001-1",
    }

    def stamps() -> dict[str, tuple[int, int]]:
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first.out_dir.glob("*.npz")}

    before = stamps()
    second = preprocess_cases(dirs, cache, CONFIG, progress=False)
    assert (second.processed, second.cached, second.failed) == (0, 3, [])
    assert stamps() == before

    # new content for one case (new hash): only that case is processed again
    old_image = load_npz(first.out_dir / "case0001.npz")["image"]
    write_case(nifti, "case0001", seed=7, content_hash="hash-new")
    third = preprocess_cases(dirs, cache, CONFIG, progress=False)
    assert (third.processed, third.cached) == (1, 2)
    after = stamps()
    assert after["case0001.npz"] != before["case0001.npz"]
    assert {k: v for k, v in after.items() if k != "case0001.npz"} == {
        k: v for k, v in before.items() if k != "case0001.npz"
    }
    assert {e["case_key"]: e["content_hash"] for e in load_index(first.out_dir)}["case0001"] == "hash-new"
    assert not np.array_equal(load_npz(first.out_dir / "case0001.npz")["image"], old_image)

    # a new case: only it is processed
    dirs.append(write_case(nifti, "case0003", seed=3))
    fourth = preprocess_cases(dirs, cache, CONFIG, progress=False)
    assert (fourth.processed, fourth.cached) == (1, 3)
    assert len(load_index(first.out_dir)) == 4

    # another config: another folder, everything processed there, the old folder untouched
    other = PreprocessConfig(spacing_mm=(3.0, 3.0, 3.0), spatial_size=(16, 16, 16))
    fifth = preprocess_cases(dirs, cache, other, progress=False)
    assert fifth.out_dir != first.out_dir and fifth.out_dir.parent == cache
    assert (fifth.processed, fifth.cached) == (4, 0)
    assert load_npz(fifth.out_dir / "case0000.npz")["image"].shape == (4, 16, 16, 16)
    assert len(load_index(first.out_dir)) == 4
    assert json.loads((fifth.out_dir / "config.json").read_text())["spacing_mm"] == [3.0, 3.0, 3.0]


def test_broken_cases_are_reported_not_indexed(tmp_path: Path) -> None:
    nifti = tmp_path / "nifti"
    good = write_case(nifti, "good0001")
    _, label = make_arrays(0)
    bad_label = write_case(nifti, "badlabel", label=np.where(label > 0, 5, 0).astype(np.uint8))
    bad_channels = write_case(nifti, "badchans", channels=["T1", "FLAIR", "T1c", "T2"])
    no_json = nifti / "nojson01"
    no_json.mkdir()

    report = preprocess_cases(
        [good, bad_label, bad_channels, no_json], tmp_path / "cache", CONFIG, progress=False
    )
    assert (report.processed, report.cached) == (1, 0)
    reasons = dict(report.failed)
    assert set(reasons) == {"badlabel", "badchans", "nojson01"}
    assert "0..3" in reasons["badlabel"]
    assert "channels" in reasons["badchans"]
    assert "case.json" in reasons["nojson01"]
    assert [e["case_key"] for e in load_index(report.out_dir)] == ["good0001"]
    assert not (report.out_dir / "badlabel.npz").exists()
    json.dumps(report.to_dict())  # JSON-serialisable


def test_config_hash_and_validation() -> None:
    a = PreprocessConfig()
    assert a.config_hash() == PreprocessConfig(spacing_mm=[2, 2, 2]).config_hash()  # type: ignore[arg-type]
    assert len(a.config_hash()) == 12 and int(a.config_hash(), 16) >= 0
    assert a.config_hash() != PreprocessConfig(spatial_size=(64, 64, 64)).config_hash()
    assert a.config_hash() != PreprocessConfig(crop_foreground=False).config_hash()
    with pytest.raises(ValueError, match="spacing_mm"):
        PreprocessConfig(spacing_mm=(2.0, 0.0, 2.0))
    with pytest.raises(ValueError, match="spatial_size"):
        PreprocessConfig(spatial_size=(64, 64))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="normalization"):
        PreprocessConfig(normalization="minmax")
