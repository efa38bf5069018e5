"""Slice-stack geometry in DICOM patient coordinates (LPS, mm).

Index convention (DICOM order): voxel ``(k, r, c)`` is slice ``k`` (along the slice normal), row
``r`` and column ``c``. Its centre is ``origin + k * slice_spacing * normal
+ r * pixel_spacing[0] * col_cosine + c * pixel_spacing[1] * row_cosine``, where ``row_cosine``
and ``col_cosine`` are ImageOrientationPatient[:3] and [3:] and ``normal = row x col``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from jipfed.imaging.synth.profiles import ORIENTATIONS

#: (row_cosine, col_cosine) per plain orientation, LPS.
_PLANES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}
#: "oblique" = axial tilted about the left-right axis, then turned about the vertical axis (deg).
OBLIQUE_TILT_DEG = 18.0
OBLIQUE_TURN_DEG = 7.0
_UNIT_TOL = 1e-6


@dataclass(frozen=True, eq=False)
class SliceGeometry:
    """A regular stack of ``n_slices`` slices of ``rows`` x ``cols`` pixels."""

    rows: int
    cols: int
    n_slices: int
    origin: np.ndarray  # (3,) ImagePositionPatient of slice 0
    row_cosine: np.ndarray  # (3,) unit, direction of increasing column index
    col_cosine: np.ndarray  # (3,) unit, direction of increasing row index
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    slice_spacing: float  # mm between slice centres along the normal
    slice_thickness: float  # mm

    def __post_init__(self) -> None:
        for name in ("rows", "cols", "n_slices"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("origin", "row_cosine", "col_cosine"):
            value = np.asarray(getattr(self, name), dtype=float)
            if value.shape != (3,) or not np.isfinite(value).all():
                raise ValueError(f"{name} must be 3 finite numbers, got {getattr(self, name)!r}")
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        if (
            abs(np.linalg.norm(self.row_cosine) - 1) > _UNIT_TOL
            or abs(np.linalg.norm(self.col_cosine) - 1) > _UNIT_TOL
        ):
            raise ValueError("row_cosine and col_cosine must be unit vectors")
        if abs(float(self.row_cosine @ self.col_cosine)) > _UNIT_TOL:
            raise ValueError("row_cosine and col_cosine must be orthogonal")
        if len(self.pixel_spacing) != 2 or min(self.pixel_spacing) <= 0:
            raise ValueError(f"pixel_spacing must be 2 positive numbers, got {self.pixel_spacing!r}")
        if self.slice_spacing <= 0 or self.slice_thickness <= 0:
            raise ValueError(
                f"slice_spacing and slice_thickness must be positive, got {self.slice_spacing!r}, "
                f"{self.slice_thickness!r}"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_slices, rows, cols)."""
        return (self.n_slices, self.rows, self.cols)

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal, ``row_cosine x col_cosine``; slice ``k`` lies at ``k * slice_spacing``."""
        return np.cross(self.row_cosine, self.col_cosine)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel step in mm along (k, r, c)."""
        return (float(self.slice_spacing), float(self.pixel_spacing[0]), float(self.pixel_spacing[1]))

    @property
    def axes(self) -> np.ndarray:
        """(3, 3): rows are the unit directions of increasing k, r and c."""
        return np.stack([self.normal, self.col_cosine, self.row_cosine])

    def slice_positions(self) -> np.ndarray:
        """(n_slices, 3) ImagePositionPatient of every slice."""
        k = np.arange(self.n_slices, dtype=float)[:, None]
        return self.origin + k * self.slice_spacing * self.normal

    def affine(self) -> np.ndarray:
        """4x4 map from homogeneous (k, r, c, 1) indices to LPS mm."""
        out = np.eye(4)
        out[:3, :3] = (self.axes * np.array(self.spacing)[:, None]).T
        out[:3, 3] = self.origin
        return out

    def voxel_centres(self) -> np.ndarray:
        """(n_slices, rows, cols, 3) LPS coordinates of every voxel centre, mm."""
        grids = np.meshgrid(
            *(np.arange(n, dtype=float) * step for n, step in zip(self.shape, self.spacing, strict=True)),
            indexing="ij",
            sparse=True,
        )
        axes = self.axes
        return self.origin + sum(g[..., None] * axes[i] for i, g in enumerate(grids))

    def image_orientation(self) -> list[float]:
        """ImageOrientationPatient (row cosine, then column cosine), rounded for the header."""
        return [_ds(v) for v in (*self.row_cosine, *self.col_cosine)]


def _ds(value: float) -> float:
    """Round to what a 16-character DS can hold exactly (avoids -0.0 and 1e-17 noise)."""
    rounded = round(float(value), 10)
    return 0.0 if rounded == 0 else rounded


def orientation_cosines(orientation: str) -> tuple[np.ndarray, np.ndarray]:
    """(row_cosine, col_cosine) for one of :data:`~jipfed.imaging.synth.profiles.ORIENTATIONS`."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    if orientation == "oblique":
        tilt, turn = math.radians(OBLIQUE_TILT_DEG), math.radians(OBLIQUE_TURN_DEG)
        about_x = np.array(
            [[1, 0, 0], [0, math.cos(tilt), -math.sin(tilt)], [0, math.sin(tilt), math.cos(tilt)]]
        )
        about_z = np.array(
            [[math.cos(turn), -math.sin(turn), 0], [math.sin(turn), math.cos(turn), 0], [0, 0, 1]]
        )
        rotation = about_z @ about_x
        row, col = _PLANES["axial"]
        return rotation @ np.array(row), rotation @ np.array(col)
    row, col = _PLANES[orientation]
    return np.array(row), np.array(col)


def centred_geometry(
    shape: tuple[int, int, int],
    *,
    pixel_spacing: tuple[float, float],
    slice_thickness: float,
    orientation: str = "axial",
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> SliceGeometry:
    """Contiguous stack of ``shape = (rows, cols, slices)`` whose middle voxel sits at ``centre``.

    The values stored in the header (rounded cosines, origin rounded to 1e-4 mm) are the
    geometry's own values, so positions recomputed from the header match it exactly.
    """
    rows, cols, n_slices = (int(n) for n in shape)
    row_cos, col_cos = orientation_cosines(orientation)
    row_cos = np.array([_ds(v) for v in row_cos])
    col_cos = np.array([_ds(v) for v in col_cos])
    normal = np.cross(row_cos, col_cos)
    half = (
        (cols - 1) / 2 * pixel_spacing[1] * row_cos
        + (rows - 1) / 2 * pixel_spacing[0] * col_cos
        + (n_slices - 1) / 2 * slice_thickness * normal
    )
    origin = np.round(np.asarray(centre, dtype=float) - half, 4)
    return SliceGeometry(
        rows=rows,
        cols=cols,
        n_slices=n_slices,
        origin=origin,
        row_cosine=row_cos,
        col_cosine=col_cos,
        pixel_spacing=(float(pixel_spacing[0]), float(pixel_spacing[1])),
        slice_spacing=float(slice_thickness),
        slice_thickness=float(slice_thickness),
    )
