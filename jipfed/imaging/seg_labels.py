"""DICOM SEG (BINARY) → one uint8 label map on the voxel grid of the converted image.

Each stored SEG frame is placed with its own ImagePositionPatient, the (shared or per-frame)
ImageOrientationPatient and PixelSpacing: its pixel (row r, column c) lands on the image voxel
``origin + r * row_step + c * col_step``, where ``origin`` is the voxel holding the frame's first
pixel and the steps are signed unit steps along image axes. So the mapping needs no assumption
about frame order, omitted empty frames or dcm2niix's axis flips, and it refuses (rather than
resamples) any frame whose pixels are not image voxel centres within ``tol`` voxels.

Segment number = label value (BraTS numbering: 1 core, 2 oedema, 3 enhancing). Where segments
overlap, the higher segment number wins.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from jipfed.imaging.dicom_io import (
    InstanceUnreadable,
    functional_group,
    read_instance,
    short_error,
    to_explicit_little_endian,
    transfer_syntax,
)

logger = logging.getLogger(__name__)

#: NIfTI (RAS) world coordinates → DICOM patient (LPS) coordinates.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
DEFAULT_TOL = 1e-3  # voxels


class SegRejected(Exception):
    """A SEG that cannot be turned into a label map on the image grid, with the reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def signed_permutation(
    src_affine: np.ndarray, dst_affine: np.ndarray, *, columns: int = 3, tol: float = DEFAULT_TOL
) -> np.ndarray:
    """Integer matrix M with ``dst_index = M @ src_index`` when the grids share voxel centres.

    Both affines map voxel indices to the same world space. Only the first ``columns`` source
    axes are checked (2 for a single frame): each must step by exactly one destination voxel
    along one destination axis, and the source origin must be a destination voxel centre, all
    within ``tol`` voxels. Raises ValueError otherwise. Returns a (3, 4) integer matrix acting on
    homogeneous indices; unchecked columns are zero.
    """
    m = np.linalg.solve(np.asarray(dst_affine, float), np.asarray(src_affine, float))[:3]
    checked = np.concatenate([m[:, :columns], m[:, 3:]], axis=1)
    rounded = np.rint(checked)
    if np.abs(checked - rounded).max() > tol:
        raise ValueError(
            f"grids do not share voxel centres (deviation {np.abs(checked - rounded).max():.3g} voxels)"
        )
    steps = rounded[:, :columns]
    if (
        not (np.abs(steps).sum(axis=0) == 1).all()
        or len({int(np.argmax(np.abs(c))) for c in steps.T}) != columns
    ):
        raise ValueError(f"grids differ by more than a permutation and flips of axes: {steps.tolist()}")
    result = np.zeros((3, 4), dtype=np.int64)
    result[:, :columns] = steps
    result[:, 3] = rounded[:, -1]
    return result


def seg_label_map(
    seg_file: Path,
    image_affine: np.ndarray,
    image_shape: tuple[int, int, int],
    *,
    frame_of_reference_uid: str,
    source_sop_instance_uids: Collection[str],
    tol: float = DEFAULT_TOL,
) -> np.ndarray:
    """Read a BINARY SEG and return its label map (X, Y, Z) uint8 on the image grid.

    Args:
        seg_file: the SEG instance.
        image_affine: the image's NIfTI affine (voxel index → RAS mm).
        image_shape: the image's spatial shape (X, Y, Z).
        frame_of_reference_uid: the images' FrameOfReferenceUID; the SEG's must be equal.
        source_sop_instance_uids: SOPInstanceUIDs of the case's images; every instance the SEG
            references must be among them.
        tol: largest allowed distance, in voxels, of a SEG pixel centre from a voxel centre.

    Raises:
        SegRejected: wrong frame of reference, unknown referenced instances, unsupported
            segmentation type, or frames that do not lie on the image grid.
    """
    seg = read_segmentation(seg_file)
    if str(seg.get("FrameOfReferenceUID", "")) != frame_of_reference_uid:
        raise SegRejected("SEG FrameOfReferenceUID differs from the images'")
    unknown = _referenced_instances(seg) - set(source_sop_instance_uids)
    if unknown:
        raise SegRejected(f"SEG references {len(unknown)} SOP instance(s) not in the case")
    if str(seg.SegmentationType) != "BINARY":
        raise SegRejected(f"unsupported SegmentationType {seg.SegmentationType} (BINARY expected)")
    numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence]
    if not numbers or min(numbers) < 1 or max(numbers) > 255:
        raise SegRejected(f"segment numbers must lie in 1..255 to serve as uint8 labels: {numbers}")

    label = np.zeros(image_shape, dtype=np.uint8)
    n_frames = int(seg.get("NumberOfFrames", 0) or 0)
    if n_frames == 0:
        return label
    frames = np.asarray(seg.pixel_array).reshape(n_frames, int(seg.Rows), int(seg.Columns))
    grid_lps = RAS_TO_LPS @ np.asarray(image_affine, float)
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else Dataset()
    for index, (frame, groups) in enumerate(zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True)):
        number = int(_group(groups, shared, "SegmentIdentificationSequence").ReferencedSegmentNumber)
        mapping = _frame_mapping(groups, shared, grid_lps, tol, index)
        rows, cols = np.nonzero(frame)
        if rows.size == 0:
            continue
        voxels = mapping[:, 0:1] * cols + mapping[:, 1:2] * rows + mapping[:, 3:4]
        corners = (
            mapping[:, :2] @ np.array([[0, frame.shape[1] - 1], [0, frame.shape[0] - 1]]) + mapping[:, 3:4]
        )
        if (corners.min(axis=1) < 0).any() or (corners.max(axis=1) >= np.array(image_shape)).any():
            raise SegRejected(f"SEG frame {index + 1} lies (partly) outside the image grid")
        target = (voxels[0], voxels[1], voxels[2])
        label[target] = np.maximum(label[target], number)
    logger.debug("SEG %s: %d frames, labels %s", seg_file.name, n_frames, np.unique(label).tolist())
    return label


def read_segmentation(seg_file: Path) -> hd.seg.Segmentation:
    """Read a SEG in any transfer syntax (normalised to Explicit VR Little Endian for highdicom)."""
    try:
        ds = read_instance(seg_file)
        if transfer_syntax(ds) != ExplicitVRLittleEndian:
            ds = to_explicit_little_endian(ds)
        return hd.seg.Segmentation.from_dataset(ds, copy=False)
    except InstanceUnreadable as exc:
        raise SegRejected(f"unreadable SEG: {exc.reason}") from exc
    except Exception as exc:  # noqa: BLE001 - highdicom raises many types for a malformed SEG
        raise SegRejected(f"unreadable SEG ({short_error(exc)})") from exc


def _referenced_instances(seg: Dataset) -> set[str]:
    """SOPInstanceUIDs referenced by the SEG (series-level list and per-frame derivation)."""
    uids = {
        str(instance.ReferencedSOPInstanceUID)
        for series in seg.get("ReferencedSeriesSequence", [])
        for instance in series.get("ReferencedInstanceSequence", [])
    }
    for groups in seg.get("PerFrameFunctionalGroupsSequence", []):
        for derivation in groups.get("DerivationImageSequence", []):
            uids.update(str(s.ReferencedSOPInstanceUID) for s in derivation.get("SourceImageSequence", []))
    return uids


def _group(groups: Dataset, shared: Dataset, keyword: str) -> Dataset:
    """First item of a functional group macro, per-frame taking precedence over shared."""
    item = functional_group(groups, shared, keyword)
    if item is None:
        raise SegRejected(f"SEG lacks {keyword}")
    return item


def _frame_mapping(
    groups: Dataset, shared: Dataset, grid_lps: np.ndarray, tol: float, index: int
) -> np.ndarray:
    """(3, 4) integer map from a frame's (column, row, -, 1) index to image voxel indices."""
    position = np.array(
        [float(v) for v in _group(groups, shared, "PlanePositionSequence").ImagePositionPatient]
    )
    orientation = np.array(
        [float(v) for v in _group(groups, shared, "PlaneOrientationSequence").ImageOrientationPatient]
    )
    spacing = [float(v) for v in _group(groups, shared, "PixelMeasuresSequence").PixelSpacing]
    frame_affine = np.eye(4)
    frame_affine[:3, 0] = orientation[:3] * spacing[1]
    frame_affine[:3, 1] = orientation[3:] * spacing[0]
    frame_affine[:3, 2] = np.cross(orientation[:3], orientation[3:])
    frame_affine[:3, 3] = position
    try:
        return signed_permutation(frame_affine, grid_lps, columns=2, tol=tol)
    except ValueError as exc:
        raise SegRejected(f"SEG frame {index + 1} is not on the image grid: {exc}") from exc
