"""Validation of one fetched series folder before conversion.

A series folder (``<data_root>/dicom/<StudyInstanceUID>/<SeriesInstanceUID>/``) is accepted when
every file is a readable DICOM instance of one series and, for image series, the slices form one
regular stack: same SOP class family (single-frame MR/CT images), ImageOrientationPatient,
Rows/Columns/PixelSpacing and FrameOfReferenceUID, with positions along the slice normal spaced
evenly (a gap of more than 1.5 median spacings is a missing slice). A segmentation series must be
exactly one DICOM SEG instance.

Limitation: a slice missing at either *end* of a stack leaves no gap; it is caught only when the
case's SEG references it (see :mod:`jipfed.imaging.seg_labels`). ImagesInAcquisition is not used:
it may count a whole multi-series acquisition.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

logger = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
#: Single-frame image storage classes whose slices dcm2niix stacks into a volume.
IMAGE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
        "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    }
)
ORIENTATION_TOL = 1e-4  # direction cosines
POSITION_TOL_MM = 1e-2  # in-plane drift of slice positions
SPACING_RTOL = 1e-2  # slice spacing regularity, relative to the median spacing
GAP_FACTOR = 1.5  # a step larger than this many median spacings is a missing slice
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_READ_ERRORS = (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, struct.error)


class SeriesRejected(Exception):
    """A series folder that cannot be converted, with the reason."""

    def __init__(self, folder: Path, reason: str) -> None:
        super().__init__(f"{folder}: {reason}")
        self.folder = Path(folder)
        self.reason = reason


@dataclass(frozen=True)
class SliceGeometry:
    """Geometry of a regular stack of slices, in DICOM patient coordinates (LPS, mm).

    ``origin`` is the ImagePositionPatient of the first slice after sorting along ``normal``
    (row cosine x column cosine); ``pixel_spacing`` is (between rows, between columns).
    """

    rows: int
    columns: int
    n_slices: int
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    origin: tuple[float, float, float]

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal, row cosine x column cosine."""
        return np.cross(self.orientation[:3], self.orientation[3:])

    def affine_lps(self) -> np.ndarray:
        """4x4 map from voxel index (column, row, slice) to LPS mm."""
        affine = np.eye(4)
        affine[:3, 0] = np.asarray(self.orientation[:3]) * self.pixel_spacing[1]
        affine[:3, 1] = np.asarray(self.orientation[3:]) * self.pixel_spacing[0]
        affine[:3, 2] = self.normal * self.slice_spacing
        affine[:3, 3] = self.origin
        return affine


@dataclass(frozen=True)
class SeriesInfo:
    """A validated series: headers shared by all instances, and its files in slice order.

    ``geometry`` is None for a segmentation series; ``files`` and ``sop_instance_uids`` are sorted
    along the slice normal for image series.
    """

    folder: Path
    study_uid: str
    series_uid: str
    modality: str
    description: str
    sop_class_uid: str
    frame_of_reference_uid: str | None
    files: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    geometry: SliceGeometry | None

    @property
    def n_slices(self) -> int:
        """Number of instances (slices) in the series."""
        return len(self.files)

    @property
    def is_segmentation(self) -> bool:
        """Whether this is a DICOM SEG series."""
        return self.sop_class_uid == SEGMENTATION_STORAGE


def is_hidden(path: Path) -> bool:
    """Hidden entries (``.complete.json`` cache markers, ``.partial-`` fetch folders) are not data."""
    return path.name.startswith(".")


def instance_files(folder: Path) -> list[Path]:
    """The instance files of a series folder, sorted by name; hidden files are skipped."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not is_hidden(p))


def check_series(folder: Path) -> SeriesInfo:
    """Validate a series folder and describe it; raises :class:`SeriesRejected` with the reason."""
    folder = Path(folder)
    files = instance_files(folder) if folder.is_dir() else []
    if not files:
        raise SeriesRejected(folder, "no files")
    datasets = [_read(folder, path) for path in files]
    for key in ("SeriesInstanceUID", "StudyInstanceUID"):
        values = {str(ds.get(key, "")) for ds in datasets}
        if len(values) != 1 or "" in values:
            raise SeriesRejected(folder, f"mixed or missing {key}: {sorted(values)}")
    sop_classes = {str(ds.get("SOPClassUID", "")) for ds in datasets}
    if SEGMENTATION_STORAGE in sop_classes:
        if len(sop_classes) != 1:
            raise SeriesRejected(
                folder, f"SEG mixed with other SOP classes: {sorted(map(_sop_name, sop_classes))}"
            )
        return _check_segmentation(folder, files, datasets)
    for path, ds in zip(files, datasets, strict=True):
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class not in IMAGE_SOP_CLASSES:
            raise SeriesRejected(folder, f"{path.name}: non-image SOP class {_sop_name(sop_class)}")
        _check_pixel_data(folder, path, ds)
    if len(sop_classes) != 1:
        raise SeriesRejected(folder, f"mixed SOP classes: {sorted(_sop_name(u) for u in sop_classes)}")
    frames_of_reference = {str(ds.get("FrameOfReferenceUID", "")) for ds in datasets}
    if len(frames_of_reference) != 1 or "" in frames_of_reference:
        raise SeriesRejected(folder, f"mixed or missing FrameOfReferenceUID: {sorted(frames_of_reference)}")
    geometry, order = _stack_geometry(folder, files, datasets)
    first = datasets[0]
    return SeriesInfo(
        folder=folder,
        study_uid=str(first.StudyInstanceUID),
        series_uid=str(first.SeriesInstanceUID),
        modality=str(first.get("Modality", "")),
        description=str(first.get("SeriesDescription", "")),
        sop_class_uid=str(first.SOPClassUID),
        frame_of_reference_uid=frames_of_reference.pop(),
        files=tuple(files[i] for i in order),
        sop_instance_uids=tuple(str(datasets[i].SOPInstanceUID) for i in order),
        geometry=geometry,
    )


def _read(folder: Path, path: Path) -> Dataset:
    """Read one instance; pydicom stops silently at a premature end of file, so a truncated
    header shows up as missing required attributes (truncated pixel data is checked later)."""
    try:
        ds = pydicom.dcmread(path)
    except _READ_ERRORS as exc:
        raise SeriesRejected(folder, f"{path.name}: unreadable ({type(exc).__name__}: {exc})") from exc
    missing = [keyword for keyword in _REQUIRED if keyword not in ds]
    if missing:
        raise SeriesRejected(
            folder, f"{path.name}: incomplete header, no {', '.join(missing)} (truncated file?)"
        )
    return ds


def _sop_name(uid: str) -> str:
    name = UID(uid).name if uid else "<missing>"
    return f"{name} ({uid})" if name != uid else uid


def _check_segmentation(folder: Path, files: list[Path], datasets: list[Dataset]) -> SeriesInfo:
    if len(datasets) != 1:
        raise SeriesRejected(folder, f"a SEG series must hold exactly one instance, found {len(datasets)}")
    ds = datasets[0]
    if str(ds.get("SOPClassUID", "")) != SEGMENTATION_STORAGE:
        raise SeriesRejected(folder, f"{files[0].name}: non-SEG SOP class in a SEG series")
    if "PixelData" not in ds:
        raise SeriesRejected(folder, f"{files[0].name}: no pixel data")
    return SeriesInfo(
        folder=folder,
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        modality=str(ds.get("Modality", "")),
        description=str(ds.get("SeriesDescription", "")),
        sop_class_uid=SEGMENTATION_STORAGE,
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")) or None,
        files=tuple(files),
        sop_instance_uids=(str(ds.SOPInstanceUID),),
        geometry=None,
    )


def _check_pixel_data(folder: Path, path: Path, ds: Dataset) -> None:
    """Reject missing, multi-frame or (for uncompressed transfer syntaxes) truncated pixel data."""
    if "PixelData" not in ds:
        raise SeriesRejected(folder, f"{path.name}: no pixel data (truncated file?)")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise SeriesRejected(folder, f"{path.name}: multi-frame image, expected single-frame slices")
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return
    expected = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * int(ds.BitsAllocated) // 8
    if len(ds.PixelData) < expected:
        raise SeriesRejected(
            folder, f"{path.name}: truncated pixel data ({len(ds.PixelData)} of {expected} bytes)"
        )


def _stack_geometry(
    folder: Path, files: list[Path], datasets: list[Dataset]
) -> tuple[SliceGeometry, list[int]]:
    """Check that the slices form one regular stack; return its geometry and the slice order."""
    try:
        orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
        spacings = np.array([[float(v) for v in ds.PixelSpacing] for ds in datasets])
        sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    except (AttributeError, ValueError, TypeError) as exc:
        raise SeriesRejected(folder, f"missing or malformed geometry attribute: {exc}") from exc
    if orientations.shape[1] != 6 or positions.shape[1] != 3 or spacings.shape[1] != 2:
        raise SeriesRejected(folder, "malformed ImageOrientationPatient/ImagePositionPatient/PixelSpacing")
    bad = np.flatnonzero(np.abs(orientations - orientations[0]).max(axis=1) > ORIENTATION_TOL)
    if bad.size:
        raise SeriesRejected(
            folder, f"mixed ImageOrientationPatient ({files[bad[0]].name} differs from {files[0].name})"
        )
    if len(sizes) != 1 or np.abs(spacings - spacings[0]).max() > ORIENTATION_TOL:
        raise SeriesRejected(folder, f"inconsistent Rows/Columns/PixelSpacing: {sorted(sizes)}")
    if len(datasets) < 2:
        raise SeriesRejected(folder, "a single slice is not a volume")
    row_cos, col_cos = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row_cos, col_cos)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3 or abs(row_cos @ col_cos) > 1e-3:
        raise SeriesRejected(folder, "ImageOrientationPatient is not orthonormal")
    distance = positions @ normal
    order = [int(i) for i in np.argsort(distance, kind="stable")]
    steps = np.diff(distance[order])
    median = float(np.median(steps))
    if median <= POSITION_TOL_MM or steps.min() <= POSITION_TOL_MM:
        raise SeriesRejected(folder, "duplicate slice positions")
    drift = positions[order] - positions[order[0]] - np.outer(distance[order] - distance[order[0]], normal)
    if np.abs(drift).max() > POSITION_TOL_MM:
        raise SeriesRejected(folder, "slices are not stacked along the slice normal (gantry tilt?)")
    gaps = np.flatnonzero(steps > GAP_FACTOR * median)
    if gaps.size:
        i = int(gaps[0])
        raise SeriesRejected(
            folder,
            f"missing slice: gap of {steps[i]:.3g} mm after {files[order[i]].name} "
            f"(median spacing {median:.3g} mm)",
        )
    if np.abs(steps - median).max() > SPACING_RTOL * median:
        raise SeriesRejected(folder, f"irregular slice spacing ({steps.min():.4g}..{steps.max():.4g} mm)")
    rows, columns = sizes.pop()
    geometry = SliceGeometry(
        rows=rows,
        columns=columns,
        n_slices=len(datasets),
        orientation=tuple(float(v) for v in orientations[0]),  # type: ignore[arg-type]
        pixel_spacing=(float(spacings[0, 0]), float(spacings[0, 1])),
        slice_spacing=median,
        origin=tuple(float(v) for v in positions[order[0]]),  # type: ignore[arg-type]
    )
    return geometry, order
