"""Wall time of DICOM → NIfTI conversion of one synthetic case: our pipeline vs dcm2niix vs dicom2nifti.

One case of 4 MR series (rows x cols x slices, default 256 x 256 x 100) plus its SEG, written by
``jipfed.imaging.synth`` and copied into the fetch-cache layout. Timed, each the median of
``--repeats`` runs into a fresh output folder:

- ``dcm2niix``: the bare command (``-z y -b n``) on each of the 4 series folders;
- ``dicom2nifti``: ``dicom_series_to_nifti(..., reorient_nifti=False)`` on each series (gzip);
- ``convert_case``: our whole case conversion (content hash, header checks, dcm2niix, channel
  stacking, SEG → label map, writing image/label/case.json);
- ``convert_case (cached)``: a second call on unchanged input (content hash only).

``--syntax NAME`` re-encodes the whole case first (a key of
``jipfed.testing.transfer_syntaxes.SYNTAXES`` that dcm2niix reads: rle, jpeg_ls, jpeg2000, ...),
to see what verifying compressed pixel data and normalising costs.

Run: ``.venv/bin/python benchmarks/convert.py [--rows 256 --cols 256 --slices 100 --repeats 3
--syntax explicit_le]``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dicom2nifti
import pydicom

from jipfed.imaging.convert import convert_case, find_dcm2niix
from jipfed.imaging.dicom_io import DCM2NIIX_SYNTAXES
from jipfed.imaging.synth import default_site_profiles, write_dataset
from jipfed.testing.corrupt import fetch_layout
from jipfed.testing.transfer_syntaxes import SYNTAXES, reencode_case


def make_case(root: Path, shape: tuple[int, int, int], syntax: str = "explicit_le") -> Path:
    """Write one synthetic case (re-encoded in ``syntax``) and return its study folder in the
    fetch-cache layout."""
    (profile,) = default_site_profiles(1, 1)
    write_dataset(root / "synth", [profile], shape=shape, seed=0, progress=False)
    case_dir = sorted((root / "synth" / profile.site_id / "dicom").iterdir())[0]
    if syntax != "explicit_le":
        case_dir = reencode_case(case_dir, root / "encoded", syntax, SYNTAXES[syntax])
    return fetch_layout(case_dir, root / "dicom")


def mr_series(study_dir: Path) -> list[Path]:
    """The study's MR series folders (by the Modality of their first file)."""
    return [
        p
        for p in sorted(study_dir.iterdir())
        if pydicom.dcmread(next(p.iterdir()), stop_before_pixels=True).Modality == "MR"
    ]


def time_runs(run: Callable[[Path], object], work: Path, repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls, each into a fresh output folder."""
    times = []
    for i in range(repeats):
        out = work / f"run{i}"
        out.mkdir(parents=True)
        start = time.perf_counter()
        run(out)
        times.append(time.perf_counter() - start)
        shutil.rmtree(out)
    return times


def main() -> None:
    """Build the case, time each method, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--cols", type=int, default=256)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    # the bare dcm2niix baseline needs a syntax dcm2niix reads (not deflated, not big endian)
    readable = sorted(name for name, uid in SYNTAXES.items() if uid in DCM2NIIX_SYNTAXES)
    parser.add_argument("--syntax", choices=readable, default="explicit_le")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    binary = find_dcm2niix()

    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        study = make_case(root, (args.rows, args.cols, args.slices), args.syntax)
        series = mr_series(study)
        print(
            f"case: {len(series)} MR series of {args.rows}x{args.cols}x{args.slices} + SEG, {args.syntax} "
            f"(synthesised in {time.perf_counter() - start:.1f} s); median of {args.repeats} runs"
        )

        def run_dcm2niix(out: Path) -> None:
            for i, folder in enumerate(series):
                cmd = [binary, "-z", "y", "-b", "n", "-f", f"s{i}", "-o", str(out), str(folder)]
                subprocess.run(cmd, check=True, capture_output=True)

        def run_dicom2nifti(out: Path) -> None:
            for i, folder in enumerate(series):
                dicom2nifti.dicom_series_to_nifti(
                    str(folder), str(out / f"s{i}.nii.gz"), reorient_nifti=False
                )

        def run_ours(out: Path) -> None:
            convert_case(study, out, dcm2niix=binary)

        cached_root = root / "cached"
        convert_case(study, cached_root, dcm2niix=binary)

        results = {
            "dcm2niix (4 series)": time_runs(run_dcm2niix, root / "w1", args.repeats),
            "dicom2nifti (4 series)": time_runs(run_dicom2nifti, root / "w2", args.repeats),
            "convert_case (full case)": time_runs(run_ours, root / "w3", args.repeats),
            "convert_case (cached)": time_runs(
                lambda _out: convert_case(study, cached_root, dcm2niix=binary), root / "w4", args.repeats
            ),
        }
    reference = statistics.median(results["dcm2niix (4 series)"])
    print(f"{'method':<26} {'median s':>9} {'min s':>7} {'x dcm2niix':>11}")
    for name, times in results.items():
        median = statistics.median(times)
        print(f"{name:<26} {median:>9.2f} {min(times):>7.2f} {median / reference:>11.2f}")


if __name__ == "__main__":
    main()
