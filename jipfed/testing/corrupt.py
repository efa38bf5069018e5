"""Converter test inputs: a case in the fetch-cache layout, and each kind of corrupt input.

:func:`fetch_layout` copies a synthetic case (``<case_id>/<SERIES>/*.dcm``) into the layout the
fetcher produces (``<dicom_root>/<StudyInstanceUID>/<SeriesInstanceUID>/*.dcm``). Every other
function changes such a study folder in place and returns the series folder it damaged, which is
the folder the converter must blame. Series are found by their headers, as the converter finds
them. Copy a good case first (``shutil.copytree``) when the original must survive.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

logger = logging.getLogger(__name__)

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
GRAYSCALE_SOFTCOPY_PS = "1.2.840.10008.5.1.4.1.1.11.1"
_COPIED = (
    "PatientName",
    "PatientID",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "SeriesInstanceUID",
    "SeriesNumber",
)


def fetch_layout(case_dir: Path, dicom_root: Path) -> Path:
    """Copy a case's series folders to ``<dicom_root>/<StudyUID>/<SeriesUID>/``; return the study folder."""
    study_dir = None
    for series_dir in sorted(p for p in Path(case_dir).iterdir() if p.is_dir()):
        ds = pydicom.dcmread(next(series_dir.iterdir()), stop_before_pixels=True)
        study_dir = Path(dicom_root) / str(ds.StudyInstanceUID)
        shutil.copytree(series_dir, study_dir / str(ds.SeriesInstanceUID))
    if study_dir is None:
        raise FileNotFoundError(f"no series folders in {case_dir}")
    return study_dir


def find_series(study_dir: Path, *, modality: str = "MR", description: str | None = None) -> Path:
    """The first series folder (sorted) whose Modality (and SeriesDescription, if given) match."""
    for series_dir in sorted(p for p in Path(study_dir).iterdir() if p.is_dir()):
        ds = pydicom.dcmread(next(series_dir.iterdir()), stop_before_pixels=True)
        if ds.get("Modality") == modality and (
            description is None or ds.get("SeriesDescription") == description
        ):
            return series_dir
    raise FileNotFoundError(f"no {modality} series {description or ''} in {study_dir}")


def slices_along_normal(series_dir: Path) -> list[Path]:
    """The image files of a series sorted by position along the slice normal."""
    keyed = []
    for path in sorted(series_dir.iterdir()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        keyed.append(
            (float(np.cross(iop[:3], iop[3:]) @ np.array([float(v) for v in ds.ImagePositionPatient])), path)
        )
    return [path for _, path in sorted(keyed)]


def missing_slice(study_dir: Path, *, edge: bool = False) -> Path:
    """Delete the middle slice (or, with ``edge``, the last one) of the first MR series."""
    series_dir = find_series(study_dir)
    slices = slices_along_normal(series_dir)
    victim = slices[-1] if edge else slices[len(slices) // 2]
    victim.unlink()
    return series_dir


def mixed_orientation(study_dir: Path, *, degrees: float = 5.0) -> Path:
    """Rotate the middle slice's ImageOrientationPatient about its normal by ``degrees``."""
    series_dir = find_series(study_dir)
    slices = slices_along_normal(series_dir)
    path = slices[len(slices) // 2]
    ds = pydicom.dcmread(path)
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    row, col = iop[:3], iop[3:]
    angle = np.deg2rad(degrees)
    new_row = np.cos(angle) * row + np.sin(angle) * col
    new_col = -np.sin(angle) * row + np.cos(angle) * col
    ds.ImageOrientationPatient = [round(float(v), 8) for v in (*new_row, *new_col)]
    ds.save_as(path)
    return series_dir


def non_image_instance(
    study_dir: Path, *, sop_class_uid: str = BASIC_TEXT_SR, series_dir: Path | None = None
) -> Path:
    """Add a non-image instance (default a Basic Text SR) to ``series_dir`` (default: the first MR
    series' folder) as ``zz_<modality>.dcm``."""
    series_dir = series_dir or find_series(study_dir)
    template = pydicom.dcmread(min(series_dir.iterdir()), stop_before_pixels=True)
    ds = Dataset()
    for keyword in _COPIED:
        if keyword in template:
            setattr(ds, keyword, template.data_element(keyword).value)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "PR" if sop_class_uid == GRAYSCALE_SOFTCOPY_PS else "SR"
    ds.InstanceNumber = 9999
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(series_dir / f"zz_{ds.Modality.lower()}.dcm", enforce_file_format=True)
    return series_dir


def unreadable_file(study_dir: Path, *, mode: str = "truncate") -> Path:
    """Truncate the middle slice of the first MR series to half its size, or (``garbage``)
    overwrite it with random bytes."""
    if mode not in ("truncate", "garbage"):
        raise ValueError(f"mode must be 'truncate' or 'garbage', got {mode!r}")
    series_dir = find_series(study_dir)
    slices = slices_along_normal(series_dir)
    path = slices[len(slices) // 2]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if mode == "truncate" else os.urandom(len(data)))
    return series_dir


def seg_foreign_frame_of_reference(study_dir: Path) -> Path:
    """Give the SEG a new FrameOfReferenceUID (its images keep theirs)."""
    series_dir = find_series(study_dir, modality="SEG")
    path = next(series_dir.iterdir())
    ds = pydicom.dcmread(path)
    ds.FrameOfReferenceUID = generate_uid()
    ds.save_as(path)
    return series_dir


def seg_unknown_reference(study_dir: Path) -> Path:
    """Make the SEG reference a SOP instance that is not in the case."""
    series_dir = find_series(study_dir, modality="SEG")
    path = next(series_dir.iterdir())
    ds = pydicom.dcmread(path)
    ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID = generate_uid()
    ds.save_as(path)
    return series_dir


#: Corruption kind → function; each returns the series folder the converter should blame.
CORRUPTIONS: dict[str, Callable[[Path], Path]] = {
    "missing_slice": missing_slice,
    "mixed_orientation": mixed_orientation,
    "non_image_sop_class": non_image_instance,
    "unreadable_file": unreadable_file,
    "seg_foreign_frame_of_reference": seg_foreign_frame_of_reference,
    "seg_unknown_reference": seg_unknown_reference,
}


def corrupt_case(study_dir: Path, kind: str) -> Path:
    """Apply the corruption ``kind`` (a key of :data:`CORRUPTIONS`) in place; return the blamed folder."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose from {sorted(CORRUPTIONS)}")
    folder = CORRUPTIONS[kind](Path(study_dir))
    logger.debug("corrupted %s: %s", folder, kind)
    return folder
