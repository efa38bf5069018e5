"""Write synthetic cases and whole multi-site data sets to disk, with a JSON manifest.

Layout under ``out_dir``::

    <site_id>/dicom/<case_id>/<SERIES>/<NNNN>.dcm   SERIES in FLAIR, T1, T1c, T2, SEG;
                                                    NNNN = InstanceNumber (SEG: 0001)
    <site_id>/truth/<case_id>.npz                   ground truth for tests and benchmarks
    dataset.json                                    manifest: seed, shape, profiles, cases, UIDs

Only ``<site_id>/dicom/`` is meant for the PACS: the truth files (the exact stored pixel values,
the label map and the geometry) never go to the PACS; they are what tests and benchmarks compare
the pipeline's output against. Truth arrays, in DICOM order (slice along the normal, row,
column): ``images`` (4, n_slices, rows, cols) channels FLAIR, T1, T1c, T2; ``label``
(n_slices, rows, cols) uint8; ``origin`` (ImagePositionPatient of slice 0), ``row_cosine``,
``col_cosine``, ``normal``, ``pixel_spacing`` (between rows, between columns), ``slice_spacing``,
``grade``, ``case_id``, ``site_id``, ``channels``. Every file is byte-identical for the same seed
(no clock in the output; zip entries carry a fixed date).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jipfed.imaging.synth.case import (
    DEFAULT_SHAPE,
    SyntheticCase,
    case_id,
    check_seed,
    check_shape,
    generate_case,
)
from jipfed.imaging.synth.contrast import CHANNELS
from jipfed.imaging.synth.mr_series import build_mr_series, study_uids, write_mr_series
from jipfed.imaging.synth.profiles import SiteProfile
from jipfed.imaging.synth.segmentation import build_segmentation

logger = logging.getLogger(__name__)

DEFAULT_STUDY_DESCRIPTION = "BRATS-SYNTH"
MANIFEST_FILE = "dataset.json"
SERIES_FOLDERS = (*CHANNELS, "SEG")
#: Series whose images the SEG references (its frames are derived from them).
SEG_SOURCE_SERIES = "T1c"
GENERATOR_VERSION = 1
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class CaseEntry:
    """One written case as listed in the manifest."""

    case_id: str
    case_index: int
    grade: str
    study_instance_uid: str
    frame_of_reference_uid: str
    series_uids: dict[str, str]  # FLAIR, T1, T1c, T2, SEG -> SeriesInstanceUID
    label_voxels: dict[str, int]  # label value ("1", "2", "3") -> voxel count


@dataclass(frozen=True)
class SiteEntry:
    """One site of the manifest: its profile and cases."""

    profile: SiteProfile
    cases: tuple[CaseEntry, ...]

    @property
    def site_id(self) -> str:
        return self.profile.site_id


@dataclass(frozen=True)
class DatasetManifest:
    """What :func:`write_dataset` wrote (also saved as ``dataset.json``)."""

    out_dir: Path
    seed: int
    shape: tuple[int, int, int]  # (rows, cols, slices)
    study_description: str
    sites: tuple[SiteEntry, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``out_dir`` is left out so the manifest does not depend on it."""
        return {
            "generator_version": GENERATOR_VERSION,
            "seed": self.seed,
            "shape": list(self.shape),
            "study_description": self.study_description,
            "channels": list(CHANNELS),
            "sites": [
                {
                    "site_id": site.site_id,
                    "profile": site.profile.to_dict(),
                    "cases": [case.__dict__ for case in site.cases],
                }
                for site in self.sites
            ],
        }

    @classmethod
    def load(cls, out_dir: Path) -> DatasetManifest:
        """Read ``<out_dir>/dataset.json``."""
        data = json.loads((Path(out_dir) / MANIFEST_FILE).read_text())
        return cls(
            out_dir=Path(out_dir),
            seed=int(data["seed"]),
            shape=tuple(data["shape"]),  # type: ignore[arg-type]
            study_description=data["study_description"],
            sites=tuple(
                SiteEntry(
                    profile=SiteProfile.from_dict(site["profile"]),
                    cases=tuple(CaseEntry(**case) for case in site["cases"]),
                )
                for site in data["sites"]
            ),
        )


def case_dir(site_dir: Path, case_id: str) -> Path:
    """``<site_dir>/dicom/<case_id>``."""
    return Path(site_dir) / "dicom" / case_id


def truth_path(site_dir: Path, case_id: str) -> Path:
    """``<site_dir>/truth/<case_id>.npz``."""
    return Path(site_dir) / "truth" / f"{case_id}.npz"


def write_case(
    case: SyntheticCase, site_dir: Path, study_description: str = DEFAULT_STUDY_DESCRIPTION
) -> Path:
    """Write the case's 4 MR series, SEG and truth under ``site_dir``; return its DICOM folder.

    The DICOM folder is assembled beside its final place and renamed, replacing an older copy.
    """
    if not isinstance(study_description, str) or not study_description or len(study_description) > 64:
        raise ValueError(f"study_description must be 1-64 characters, got {study_description!r}")
    site_dir = Path(site_dir)
    final = case_dir(site_dir, case.case_id)
    staging = final.with_name(f".{case.case_id}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    uids = study_uids(case)
    for channel in CHANNELS:
        write_mr_series(case, channel, uids, study_description, staging / channel)
    sources = build_mr_series(case, SEG_SOURCE_SERIES, uids, study_description)
    with warnings.catch_warnings():
        # PatientName is the single-component pseudonym SYN-<site>-<NNN> on purpose.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        seg = build_segmentation(case, sources, uids)
    (staging / "SEG").mkdir()
    seg.save_as(staging / "SEG" / "0001.dcm", enforce_file_format=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    _write_truth(case, truth_path(site_dir, case.case_id))
    logger.debug("wrote %s (%s) to %s", case.case_id, case.grade, final)
    return final


def _write_truth(case: SyntheticCase, path: Path) -> None:
    g = case.geometry
    arrays = {
        "images": case.images,
        "label": case.label,
        "origin": g.origin,
        "row_cosine": g.row_cosine,
        "col_cosine": g.col_cosine,
        "normal": g.normal,
        "pixel_spacing": np.array(g.pixel_spacing),
        "slice_spacing": np.array(g.slice_spacing),
        "grade": np.array(case.grade),
        "case_id": np.array(case.case_id),
        "site_id": np.array(case.site_id),
        "channels": np.array(CHANNELS),
    }
    write_npz(path, arrays)


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but byte-reproducible (fixed zip entry dates); atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())
    os.replace(partial, path)


def _case_entry(case: SyntheticCase) -> CaseEntry:
    uids = study_uids(case)
    return CaseEntry(
        case_id=case.case_id,
        case_index=case.case_index,
        grade=case.grade,
        study_instance_uid=str(uids.study),
        frame_of_reference_uid=str(uids.frame_of_reference),
        series_uids={name: str(uid) for name, uid in uids.series.items()},
        label_voxels={str(v): int((case.label == v).sum()) for v in (1, 2, 3)},
    )


def write_dataset(
    out_dir: Path,
    profiles: Sequence[SiteProfile],
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    seed: int = 0,
    study_description: str = DEFAULT_STUDY_DESCRIPTION,
    progress: bool = True,
) -> DatasetManifest:
    """Generate and write every site's cases under ``out_dir``; write and return the manifest.

    ``shape`` is (rows, cols, slices). Case folders already present are replaced; folders of cases
    no longer in the profiles are left alone (with a warning).
    """
    profiles = list(profiles)
    shape = check_shape(shape)
    seed = check_seed(seed)
    if not profiles:
        raise ValueError("profiles must name at least one site")
    ids = [p.site_id for p in profiles]
    if len(set(ids)) != len(ids):
        raise ValueError(f"site ids must be unique, got {ids!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(p, i) for p in profiles for i in range(p.n_cases)]
    entries: dict[str, list[CaseEntry]] = {p.site_id: [] for p in profiles}
    for profile, index in tqdm(jobs, desc="synth cases", unit="case", disable=not progress):
        case = generate_case(profile, index, shape=shape, seed=seed)
        write_case(case, out_dir / profile.site_id, study_description=study_description)
        entries[profile.site_id].append(_case_entry(case))
    for profile in profiles:
        _warn_stale(out_dir / profile.site_id, {case_id(profile.site_id, i) for i in range(profile.n_cases)})
    manifest = DatasetManifest(
        out_dir=out_dir,
        seed=seed,
        shape=shape,
        study_description=study_description,
        sites=tuple(SiteEntry(profile=p, cases=tuple(entries[p.site_id])) for p in profiles),
    )
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=1) + "\n")
    logger.info("wrote %d cases of %d sites to %s", len(jobs), len(profiles), out_dir)
    return manifest


def _warn_stale(site_dir: Path, expected: set[str]) -> None:
    dicom = site_dir / "dicom"
    stale = sorted(
        p.name
        for p in dicom.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in expected
    )
    if stale:
        logger.warning("%s holds cases not in this data set (left alone): %s", dicom, ", ".join(stale))
