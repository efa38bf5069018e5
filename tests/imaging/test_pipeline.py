"""Site data pipeline end to end with a real Orthanc: synth → PACS → cohort → fetch → convert → preprocess.

The comparison with the synthetic ground truth reuses the converter tests' helpers
(``truth_affine``, ``truth_in_nifti_grid`` in ``test_convert.py``). Tests that need Orthanc fail
(OrthancError) when it is not installed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_convert import truth_affine, truth_in_nifti_grid

from jipfed.cli import main as cli_main
from jipfed.cohort.model import CohortCase, SeriesRef
from jipfed.commands.pipeline_demo import PassResult, format_table
from jipfed.commands.prepare import PASSWORD_ENV, add_parser, config_from_args
from jipfed.imaging.convert import case_key_for
from jipfed.imaging.dicom_cache import FetchReport
from jipfed.imaging.dicomweb import upload_folder
from jipfed.imaging.pacs import PacsConfig
from jipfed.imaging.pipeline import PrepareReport, SiteDataConfig, incomplete_reasons, prepare_site
from jipfed.imaging.preprocess import PreprocessConfig, load_index
from jipfed.imaging.seg_labels import RAS_TO_LPS
from jipfed.imaging.synth import default_site_profiles, write_dataset
from jipfed.imaging.synth.dataset import CaseEntry, DatasetManifest
from jipfed.testing.orthanc import OrthancServer

SHAPE = (32, 32, 16)  # rows, cols, slices of the synthetic series
# 2 mm: at 3 mm, nearest-neighbour sampling of the smallest tumours (~400 mm³) misses ~45 % of them
PRE = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), spatial_size=(32, 32, 24))
N_SERIES = 5  # FLAIR, T1, T1c, T2, SEG
COUNTERS = (
    "cohort_cases",
    "fetched",
    "fetch_cached",
    "converted",
    "convert_cached",
    "preprocessed",
    "preprocess_cached",
    "ready_cases",
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> DatasetManifest:
    """Two sites of three cases: site-a axial, site-b oblique slices."""
    profiles = default_site_profiles(2, 3, heterogeneous=False, orientations=("axial", "oblique"))
    return write_dataset(tmp_path_factory.mktemp("synth"), profiles, shape=SHAPE, seed=5, progress=False)


def upload_case(pacs: OrthancServer, manifest: DatasetManifest, site_id: str, case: CaseEntry) -> None:
    report = upload_folder(pacs.pacs_config, manifest.out_dir / site_id / "dicom" / case.case_id)
    assert report.ok and report.stored == report.files > 0


def truth_of(manifest: DatasetManifest, site_id: str, case: CaseEntry) -> dict[str, np.ndarray]:
    with np.load(manifest.out_dir / site_id / "truth" / f"{case.case_id}.npz", allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def counters(report: PrepareReport) -> dict[str, int]:
    return {name: getattr(report, name) for name in COUNTERS}


def assert_no_failures(report: PrepareReport) -> None:
    assert report.fetch_failed == [] and report.convert_skipped == [] and report.preprocess_failed == []


def assert_nifti_equals_truth(case_dir: Path, truth: dict[str, np.ndarray]) -> None:
    """Converted case vs ground truth: same voxel grid, labels and stored pixel values exactly."""
    image, label = nib.load(case_dir / "image.nii.gz"), nib.load(case_dir / "label.nii.gz")
    np.testing.assert_array_equal(label.affine, image.affine)
    # voxel centres coincide (helper asserts it), and the mapping is one-to-one onto the NIfTI grid
    index = truth_in_nifti_grid(truth, image.affine)
    assert label.shape == image.shape[:3] and np.prod(label.shape) == truth["label"].size
    for axis, idx in enumerate(index):
        assert idx.min() >= 0 and idx.max() < label.shape[axis]
    assert len(set(zip(*(i.ravel() for i in index), strict=True))) == truth["label"].size
    np.testing.assert_array_equal(np.asarray(label.dataobj)[index], truth["label"])
    # the converter states tolerance 0 for integer series (no rescaling)
    np.testing.assert_array_equal(np.moveaxis(np.asarray(image.dataobj)[index], -1, 0), truth["images"])


def assert_preprocessed_matches_truth(npz_path: Path, truth: dict[str, np.ndarray]) -> None:
    """Preprocessed case: shapes and dtypes, and the tumour where (and about as big as) it was."""
    with np.load(npz_path, allow_pickle=False) as npz:
        image, label, affine = npz["image"], npz["label"], npz["affine"]
    assert image.shape == (4, *PRE.spatial_size) and image.dtype == np.float32
    assert label.shape == (1, *PRE.spatial_size) and label.dtype == np.uint8
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert set(np.unique(label)) <= set(np.unique(truth["label"]))
    truth_wt, out_wt = truth["label"] > 0, label[0] > 0
    truth_ras = RAS_TO_LPS @ truth_affine(truth)  # LPS → RAS (the matrix is its own inverse)
    truth_voxel_mm3 = abs(np.linalg.det(truth_ras[:3, :3]))
    assert out_wt.sum() * np.prod(PRE.spacing_mm) == pytest.approx(truth_wt.sum() * truth_voxel_mm3, rel=0.25)
    truth_centre = nib.affines.apply_affine(truth_ras, np.argwhere(truth_wt).mean(0))
    out_centre = nib.affines.apply_affine(affine, np.argwhere(out_wt).mean(0))
    np.testing.assert_allclose(out_centre, truth_centre, atol=PRE.spacing_mm[0])


def latest_report(data_root: Path) -> dict:
    return json.loads(max((data_root / "reports").glob("prepare-*.json")).read_text())


@pytest.mark.slow
@pytest.mark.parametrize("site_index, transport", [(0, "dicomweb"), (1, "cget")], ids=["dicomweb", "cget"])
def test_prepare_site_end_to_end(
    synth: DatasetManifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, site_index: int, transport: str
) -> None:
    site = synth.sites[site_index]
    first, added = site.cases[:2], site.cases[2]
    with OrthancServer(tmp_path / "pacs") as pacs:
        for case in first:
            upload_case(pacs, synth, site.site_id, case)
        cfg = SiteDataConfig(
            site.site_id, pacs.pacs_config, tmp_path / "site", transport=transport, preprocess=PRE
        )

        # first run: everything is fetched, converted and preprocessed
        report = prepare_site(cfg, progress=False)
        assert_no_failures(report)
        assert counters(report) == dict(
            cohort_cases=2, fetched=2 * N_SERIES, fetch_cached=0, converted=2, convert_cached=0,
            preprocessed=2, preprocess_cached=0, ready_cases=2,
        )  # fmt: skip
        out_dir = Path(report.preprocessed_dir)
        assert out_dir == cfg.preprocessed_root / PRE.config_hash()
        index = {e["case_key"]: e for e in load_index(out_dir)}
        for case in first:
            key = case_key_for(case.study_instance_uid)
            truth = truth_of(synth, site.site_id, case)
            assert_nifti_equals_truth(cfg.nifti_root / key, truth)
            assert_preprocessed_matches_truth(out_dir / index[key]["file"], truth)
            assert index[key]["grade"] == case.grade
        stamps = {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.npz")}

        # second run, through the command line: nothing to do, everything counted as cached
        monkeypatch.setenv(PASSWORD_ENV, pacs.password)
        argv = [
            "prepare", "--site-id", site.site_id, "--dicomweb-url", pacs.dicomweb_url,
            "--user", pacs.username, "--dimse-port", str(pacs.dicom_port), "--data-root", str(cfg.data_root),
            "--transport", transport, "--spacing", "2", "2", "2", "--size", "32", "32", "24", "--no-progress",
        ]  # fmt: skip
        assert cli_main(argv) == 0
        again = latest_report(cfg.data_root)
        assert {name: again[name] for name in COUNTERS} == dict(
            cohort_cases=2, fetched=0, fetch_cached=2 * N_SERIES, converted=0, convert_cached=2,
            preprocessed=0, preprocess_cached=2, ready_cases=2,
        )  # fmt: skip
        assert again["preprocessed_dir"] == str(out_dir)

        # a new case in the PACS: only it is fetched, converted and preprocessed
        upload_case(pacs, synth, site.site_id, added)
        third = prepare_site(cfg, progress=False)
        assert_no_failures(third)
        assert counters(third) == dict(
            cohort_cases=3, fetched=N_SERIES, fetch_cached=2 * N_SERIES, converted=1, convert_cached=2,
            preprocessed=1, preprocess_cached=2, ready_cases=3,
        )  # fmt: skip
        assert {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.npz") if p.name in stamps} == stamps
        key = case_key_for(added.study_instance_uid)
        truth = truth_of(synth, site.site_id, added)
        assert_nifti_equals_truth(cfg.nifti_root / key, truth)
        assert_preprocessed_matches_truth(out_dir / f"{key}.npz", truth)
        assert sorted(e["case_key"] for e in load_index(out_dir)) == sorted(
            case_key_for(c.study_instance_uid) for c in site.cases
        )
        json.dumps(third.to_dict())


@pytest.mark.slow
def test_pipeline_demo_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = [
        "pipeline-demo",
        "--sites",
        "2",
        "--cases",
        "1",
        "--shape",
        "24",
        "24",
        "12",
        "--no-progress",
        "--rounds",
        "0",
    ]
    assert cli_main([*argv, "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Federated training" not in out  # --rounds 0: data pipeline only
    rows = [line.split() for line in out.splitlines() if line[:1] in ("1", "2")]
    # pass, site, transport, cases, fetched/cached/failed, converted/..., preprocessed/..., ready, seconds
    assert [row[:8] for row in rows] == [
        ["1", "site-a", "dicomweb", "1", "5/0/0", "1/0/0", "1/0/0", "1/1"],
        ["1", "site-b", "cget", "1", "5/0/0", "1/0/0", "1/0/0", "1/1"],
        ["2", "site-a", "dicomweb", "1", "0/5/0", "0/1/0", "0/1/0", "1/1"],
        ["2", "site-b", "cget", "1", "0/5/0", "0/1/0", "0/1/0", "1/1"],
    ]
    assert len(load_index(next((tmp_path / "sites" / "site-b" / "preprocessed").iterdir()))) == 1


def test_site_config_validation(tmp_path: Path) -> None:
    pacs = PacsConfig("http://127.0.0.1:8042/dicom-web")
    with pytest.raises(ValueError, match="dimse_port"):
        SiteDataConfig("site-a", pacs, tmp_path, transport="cget")
    with pytest.raises(ValueError, match="transport"):
        SiteDataConfig("site-a", pacs, tmp_path, transport="cmove")
    with pytest.raises(ValueError, match="site_id"):
        SiteDataConfig(" ", pacs, tmp_path)
    cfg = SiteDataConfig("site-a", pacs, str(tmp_path))  # type: ignore[arg-type]
    assert cfg.nifti_root == tmp_path / "nifti" and cfg.preprocessed_root == tmp_path / "preprocessed"


def test_prepare_command_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def parse(*extra: str) -> argparse.Namespace:
        base = [
            "--site-id",
            "s",
            "--dicomweb-url",
            "http://127.0.0.1:1/dicom-web",
            "--data-root",
            str(tmp_path),
        ]
        parser = argparse.ArgumentParser()
        add_parser(parser.add_subparsers())
        return parser.parse_args(["prepare", *base, *extra])

    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(ValueError, match="--user needs"):
        config_from_args(parse("--user", "u"))
    with pytest.raises(ValueError, match="without --user"):
        config_from_args(parse("--password", "p"))
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    assert config_from_args(parse("--user", "u")).pacs.auth == ("u", "from-env")
    assert config_from_args(parse("--user", "u", "--password", "p")).pacs.auth == ("u", "p")
    assert config_from_args(parse()).pacs.auth is None
    cfg = config_from_args(parse("--spacing", "1", "1", "2", "--size", "8", "8", "8", "--dimse-port", "4242"))
    assert cfg.preprocess == PreprocessConfig(spacing_mm=(1.0, 1.0, 2.0), spatial_size=(8, 8, 8))
    assert cfg.pacs.dimse_port == 4242


def test_format_table_lists_problems() -> None:
    report = PrepareReport(
        site_id="site-a", transport="cget", cohort_cases=2, cohort_series=10, fetched=5, fetch_cached=0,
        fetch_failed=[("1.2.3", "timeout")], converted=1, convert_cached=0,
        convert_skipped=[("abcd", "not all series fetched")], preprocessed=1, preprocess_cached=0,
        preprocess_failed=[], ready_cases=1, preprocessed_dir="/x", seconds={"total": 1.0},
    )  # fmt: skip
    text = format_table([PassResult(1, report, 1.25)])
    assert "5/0/1" in text and "1/0/1" in text and "1/2" in text and "1.2" in text
    assert "site-a (pass 1): abcd: not all series fetched" in text


def test_incomplete_case_reason_names_the_failed_series() -> None:
    flair, t1 = SeriesRef("1.2.3", "1.2.3.1", "MR", "FLAIR", 4), SeriesRef("1.2.3", "1.2.3.2", "MR", "T1", 4)
    broken, fine = CohortCase("1.2.3", (flair, t1)), CohortCase("1.2.4", (SeriesRef("1.2.4", "1.2.4.1", "MR", "T1", 4),))
    fetch = FetchReport(fetched=2, cached=0, failed=[("1.2.3.1", "HTTP 404")])
    assert incomplete_reasons([broken, fine], [fine], fetch) == [
        (case_key_for("1.2.3"), 'not all series fetched: series "FLAIR": HTTP 404')
    ]
    split = FetchReport(fetched=2, cached=0, failed=[("1.2.3.1", 'series "FLAIR" is split across 2 patients')])
    assert incomplete_reasons([broken], [], split)[0][1] == (
        'not all series fetched: series "FLAIR" is split across 2 patients'
    )
