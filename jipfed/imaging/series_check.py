"""Validation of one fetched series folder before conversion.

A series folder (``<data_root>/dicom/<StudyInstanceUID>/<SeriesInstanceUID>/``) is accepted when
every file is a readable DICOM instance of one series, study and patient, every image's pixel
data decodes (compressed frames included, see :mod:`jipfed.imaging.dicom_io`) and, for image
series, the slices form one regular stack: one image SOP class (single-frame MR/CT slices, or one
Enhanced / Legacy Converted Enhanced multi-frame instance placed by its per-frame functional
groups), ImageOrientationPatient,
Rows/Columns/PixelSpacing and FrameOfReferenceUID, with positions along the slice normal spaced
evenly (a gap of more than 1.5 median spacings is a missing slice). A segmentation series must be
exactly one DICOM SEG instance. Other objects in an image series (SR, presentation states,
secondary captures, RT) are left out with a note.

Limitation: a slice missing at either *end* of a stack leaves no gap; it is caught only when the
case's SEG references it (see :mod:`jipfed.imaging.seg_labels`). ImagesInAcquisition is not used:
it may count a whole multi-series acquisition.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from jipfed.imaging.dicom_io import (
    InstanceUnreadable,
    file_label,
    functional_group,
    pixel_defect,
    read_instance,
    series_label,
    transfer_syntax,
)

logger = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
#: Image storage classes dcm2niix turns into a volume: single-frame slices or one multi-frame
#: instance whose frames are placed by per-frame functional groups.
IMAGE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
        "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
    }
)
ORIENTATION_TOL = 1e-4  # direction cosines
POSITION_TOL_MM = 1e-2  # in-plane drift of slice positions
SPACING_RTOL = 1e-2  # slice spacing regularity, relative to the median spacing
GAP_FACTOR = 1.5  # a step larger than this many median spacings is a missing slice
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


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
    along the slice normal for image series (one multi-frame instance: its frames are the slices).
    ``files`` holds only the instances to convert; ``left_out`` lists (file name, reason) of other
    objects found in the folder. ``label`` names the series for a site admin (number and
    description); ``transfer_syntaxes`` is per file.
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
    label: str = ""
    transfer_syntaxes: tuple[str, ...] = ()
    left_out: tuple[tuple[str, str], ...] = ()

    @property
    def n_slices(self) -> int:
        """Number of slices (frames of a multi-frame image, else instances)."""
        return self.geometry.n_slices if self.geometry is not None else len(self.files)

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
    """Validate a series folder and describe it; raises :class:`SeriesRejected` with the reason.

    Reasons start with the series' number and description (:func:`series_label`), never with
    patient identifiers. Instances of other SOP classes in an image series (SR, presentation
    states, secondary captures, RT, ...) are left out and listed in ``left_out``.
    """
    folder = Path(folder)
    files = instance_files(folder) if folder.is_dir() else []
    if not files:
        raise SeriesRejected(folder, "no files")
    datasets, unreadable = [], []
    for path in files:
        try:
            datasets.append((path, read_instance(path, required=_REQUIRED)))
        except InstanceUnreadable as exc:
            unreadable.append(exc)
    label = series_label(datasets[0][1]) if datasets else "series of unreadable files"
    if unreadable:
        more = f" (and {len(unreadable) - 1} more file(s))" if len(unreadable) > 1 else ""
        raise SeriesRejected(folder, f"{label}: {unreadable[0]}{more}")
    _check_one_series(folder, label, [ds for _, ds in datasets])
    sop_classes = {str(ds.get("SOPClassUID", "")) for _, ds in datasets}
    if SEGMENTATION_STORAGE in sop_classes:
        if len(sop_classes) != 1:
            raise SeriesRejected(
                folder, f"{label}: SEG mixed with other SOP classes: {sorted(map(_sop_name, sop_classes))}"
            )
        return _check_segmentation(folder, label, datasets)
    images = [(path, ds) for path, ds in datasets if str(ds.SOPClassUID) in IMAGE_SOP_CLASSES]
    left_out = tuple(
        (path.name, f"{_sop_name(str(ds.SOPClassUID))} left out of {label} (not an MR/CT image)")
        for path, ds in datasets
        if str(ds.SOPClassUID) not in IMAGE_SOP_CLASSES
    )
    if not images:
        found = sorted({_sop_name(uid) for uid in sop_classes})
        raise SeriesRejected(folder, f"{label}: no MR/CT image instances, only non-image SOP class {found}")
    for path, reason in left_out:
        logger.info("%s: %s", path, reason)
    image_classes = {str(ds.SOPClassUID) for _, ds in images}
    if len(image_classes) != 1:
        raise SeriesRejected(folder, f"{label}: mixed SOP classes: {sorted(map(_sop_name, image_classes))}")
    for path, ds in images:
        defect = pixel_defect(ds)
        if defect:
            raise SeriesRejected(folder, f"{label}: {file_label(path, ds)}: {defect}")
    frames_of_reference = {str(ds.get("FrameOfReferenceUID", "")) for _, ds in images}
    if len(frames_of_reference) != 1 or "" in frames_of_reference:
        raise SeriesRejected(folder, f"{label}: mixed or missing FrameOfReferenceUID")
    try:
        geometry, order = _stack_geometry(_slices(images))
    except _GeometryError as exc:
        raise SeriesRejected(folder, f"{label}: {exc}") from exc
    first = images[0][1]
    multiframe = len(images) == 1 and int(first.get("NumberOfFrames", 1) or 1) > 1
    ordered = [images[0]] if multiframe else [images[i] for i in order]
    return SeriesInfo(
        folder=folder,
        study_uid=str(first.StudyInstanceUID),
        series_uid=str(first.SeriesInstanceUID),
        modality=str(first.get("Modality", "")),
        description=str(first.get("SeriesDescription", "")),
        sop_class_uid=str(first.SOPClassUID),
        frame_of_reference_uid=frames_of_reference.pop(),
        files=tuple(path for path, _ in ordered),
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for _, ds in ordered),
        geometry=geometry,
        label=label,
        transfer_syntaxes=tuple(str(transfer_syntax(ds)) for _, ds in ordered),
        left_out=left_out,
    )


def _check_one_series(folder: Path, label: str, datasets: list[Dataset]) -> None:
    """All instances belong to one series of one study of one patient (the patient is not named)."""
    series = {str(ds.SeriesInstanceUID) for ds in datasets}
    if len(series) != 1:
        raise SeriesRejected(folder, f"{label}: mixed or missing SeriesInstanceUID ({len(series)} series in one folder)")
    studies = {str(ds.StudyInstanceUID) for ds in datasets}
    if len(studies) != 1:
        raise SeriesRejected(folder, f"{label}: series split across {len(studies)} studies")
    patients = {str(ds.get("PatientID", "")) for ds in datasets}
    if len(patients) != 1:
        raise SeriesRejected(folder, f"{label}: series split across {len(patients)} patients (PatientID differs)")


def _sop_name(uid: str) -> str:
    name = UID(uid).name if uid else "<missing>"
    return f"{name} ({uid})" if name != uid else uid


def _check_segmentation(folder: Path, label: str, datasets: list[tuple[Path, Dataset]]) -> SeriesInfo:
    if len(datasets) != 1:
        raise SeriesRejected(
            folder, f"{label}: a SEG series must hold exactly one instance, found {len(datasets)}"
        )
    path, ds = datasets[0]
    defect = pixel_defect(ds)
    if defect:
        raise SeriesRejected(folder, f"{label}: {file_label(path, ds)}: {defect}")
    return SeriesInfo(
        folder=folder,
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        modality=str(ds.get("Modality", "")),
        description=str(ds.get("SeriesDescription", "")),
        sop_class_uid=SEGMENTATION_STORAGE,
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")) or None,
        files=(path,),
        sop_instance_uids=(str(ds.SOPInstanceUID),),
        geometry=None,
        label=label,
        transfer_syntaxes=(str(transfer_syntax(ds)),),
    )


@dataclass(frozen=True)
class _Slice:
    """One 2-D slice of a stack: a single-frame file or one frame of a multi-frame instance."""

    name: str
    orientation: list[float]
    position: list[float]
    spacing: list[float]
    size: tuple[int, int]


class _GeometryError(ValueError):
    """The slices do not form one regular stack."""


def _slices(images: list[tuple[Path, Dataset]]) -> list[_Slice]:
    """The 2-D slices of single-frame files, or the frames of one multi-frame instance."""
    multiframe = [path for path, ds in images if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    try:
        if multiframe and len(images) > 1:
            raise _GeometryError(
                f"{file_label(multiframe[0])}: multi-frame image among {len(images)} instances, expected one "
                "multi-frame instance or single-frame slices"
            )
        if multiframe:
            return _frames(*images[0])
        return [
            _Slice(
                file_label(path, ds),
                [float(v) for v in ds.ImageOrientationPatient],
                [float(v) for v in ds.ImagePositionPatient],
                [float(v) for v in ds.PixelSpacing],
                (int(ds.Rows), int(ds.Columns)),
            )
            for path, ds in images
        ]
    except (AttributeError, ValueError, TypeError, KeyError, IndexError) as exc:
        if isinstance(exc, _GeometryError):
            raise
        raise _GeometryError(f"missing or malformed geometry attribute: {exc}") from exc


def _frames(path: Path, ds: Dataset) -> list[_Slice]:
    """Frames of a multi-frame instance, placed by its per-frame (or shared) functional groups."""
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    n_frames = int(ds.NumberOfFrames)
    if len(per_frame) != n_frames:
        raise _GeometryError(f"{file_label(path, ds)}: {len(per_frame)} per-frame functional groups for {n_frames} frames")
    size = (int(ds.Rows), int(ds.Columns))
    slices = []
    for index, groups in enumerate(per_frame):
        position = functional_group(groups, shared, "PlanePositionSequence")
        orientation = functional_group(groups, shared, "PlaneOrientationSequence")
        measures = functional_group(groups, shared, "PixelMeasuresSequence")
        if position is None or orientation is None or measures is None:
            raise _GeometryError(f"{file_label(path, ds)}: frame {index + 1} lacks plane position/orientation/pixel measures")
        slices.append(
            _Slice(
                f"frame {index + 1}",
                [float(v) for v in orientation.ImageOrientationPatient],
                [float(v) for v in position.ImagePositionPatient],
                [float(v) for v in measures.PixelSpacing],
                size,
            )
        )
    return slices


def _stack_geometry(slices: list[_Slice]) -> tuple[SliceGeometry, list[int]]:
    """Check that the slices form one regular stack; return its geometry and the slice order."""
    orientations = np.array([item.orientation for item in slices])
    positions = np.array([item.position for item in slices])
    spacings = np.array([item.spacing for item in slices])
    sizes = {item.size for item in slices}
    if orientations.ndim != 2 or orientations.shape[1] != 6 or positions.shape[1] != 3 or spacings.shape[1] != 2:
        raise _GeometryError("malformed ImageOrientationPatient/ImagePositionPatient/PixelSpacing")
    bad = np.flatnonzero(np.abs(orientations - orientations[0]).max(axis=1) > ORIENTATION_TOL)
    if bad.size:
        raise _GeometryError(
            f"mixed ImageOrientationPatient ({slices[bad[0]].name} differs from {slices[0].name})"
        )
    if len(sizes) != 1 or np.abs(spacings - spacings[0]).max() > ORIENTATION_TOL:
        raise _GeometryError(f"inconsistent Rows/Columns/PixelSpacing: {sorted(sizes)}")
    if len(slices) < 2:
        raise _GeometryError("a single slice is not a volume")
    row_cos, col_cos = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row_cos, col_cos)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3 or abs(row_cos @ col_cos) > 1e-3:
        raise _GeometryError("ImageOrientationPatient is not orthonormal")
    distance = positions @ normal
    order = [int(i) for i in np.argsort(distance, kind="stable")]
    steps = np.diff(distance[order])
    median = float(np.median(steps))
    if median <= POSITION_TOL_MM or steps.min() <= POSITION_TOL_MM:
        raise _GeometryError("duplicate slice positions")
    drift = positions[order] - positions[order[0]] - np.outer(distance[order] - distance[order[0]], normal)
    if np.abs(drift).max() > POSITION_TOL_MM:
        raise _GeometryError("slices are not stacked along the slice normal (gantry tilt?)")
    gaps = np.flatnonzero(steps > GAP_FACTOR * median)
    if gaps.size:
        i = int(gaps[0])
        raise _GeometryError(
            f"missing slice: gap of {steps[i]:.3g} mm after {slices[order[i]].name} "
            f"(median spacing {median:.3g} mm)"
        )
    if np.abs(steps - median).max() > SPACING_RTOL * median:
        raise _GeometryError(f"irregular slice spacing ({steps.min():.4g}..{steps.max():.4g} mm)")
    rows, columns = sizes.pop()
    geometry = SliceGeometry(
        rows=rows,
        columns=columns,
        n_slices=len(slices),
        orientation=tuple(float(v) for v in orientations[0]),  # type: ignore[arg-type]
        pixel_spacing=(float(spacings[0, 0]), float(spacings[0, 1])),
        slice_spacing=median,
        origin=tuple(float(v) for v in positions[order[0]]),  # type: ignore[arg-type]
    )
    return geometry, order
