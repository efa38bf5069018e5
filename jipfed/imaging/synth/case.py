"""One synthetic case in memory (no I/O): geometry, stored pixel values, label map and grade.

Randomness is derived from ``(seed, site_id, case_index)`` only, so a case never changes when
cases are added to its site or sites to the data set. Grades follow a low-discrepancy sequence
per site, so every site's HGG share is close to its profile's ``hgg_fraction`` even for few cases.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from jipfed.imaging.synth.contrast import CHANNELS, render_images
from jipfed.imaging.synth.geometry import SliceGeometry, centred_geometry
from jipfed.imaging.synth.phantom import make_phantom
from jipfed.imaging.synth.profiles import SiteProfile

DEFAULT_SHAPE = (64, 64, 40)  # (rows, cols, slices)
_GOLDEN = 0.6180339887498949
_FIRST_STUDY_DAY = datetime(2022, 1, 3, 7, 30)


@dataclass(frozen=True, eq=False)
class SyntheticCase:
    """A generated case.

    ``images`` (4, n_slices, rows, cols) holds exactly the stored pixel values, channels in
    :data:`CHANNELS` order (FLAIR, T1, T1c, T2), slices in DICOM order (by position along the
    slice normal); ``label`` (n_slices, rows, cols) uint8 is the BraTS label map on the same grid.
    """

    profile: SiteProfile
    case_index: int
    seed: int
    grade: str
    images: np.ndarray
    label: np.ndarray
    geometry: SliceGeometry
    study_datetime: datetime
    tumour_radius_mm: float
    enhancement: float

    @property
    def site_id(self) -> str:
        return self.profile.site_id

    @property
    def case_id(self) -> str:
        """Pseudonymous PatientID / PatientName and folder name, ``SYN-<site>-<NNN>``."""
        return case_id(self.profile.site_id, self.case_index)

    @property
    def channels(self) -> tuple[str, ...]:
        return CHANNELS


def case_id(site_id: str, case_index: int) -> str:
    """``SYN-<site_id>-<NNN>`` with the zero-based case index."""
    return f"SYN-{site_id}-{case_index:03d}"


def _site_key(site_id: str) -> int:
    return int.from_bytes(hashlib.sha256(site_id.encode()).digest()[:8], "big")


def check_seed(seed: int) -> int:
    """``seed`` as a non-negative int; ValueError otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def case_rng(seed: int, site_id: str, case_index: int) -> np.random.Generator:
    """The generator of one case, independent of every other case."""
    return np.random.default_rng(
        np.random.SeedSequence([check_seed(seed), _site_key(site_id), case_index, 1])
    )


def case_grade(profile: SiteProfile, case_index: int, seed: int) -> str:
    """The grade, ``HGG`` or ``LGG``: a per-site golden-ratio sequence thresholded at ``hgg_fraction``."""
    offset = np.random.SeedSequence([check_seed(seed), _site_key(profile.site_id), 0]).generate_state(1)[0]
    position = (float(offset) / 2**32 + case_index * _GOLDEN) % 1.0
    return "HGG" if position < profile.hgg_fraction else "LGG"


def check_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """``shape`` as (rows, cols, slices) ints in [8, 1024]; ValueError otherwise."""
    values = tuple(shape)
    if len(values) != 3 or not all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) and 8 <= n <= 1024 for n in values
    ):
        raise ValueError(f"shape must be (rows, cols, slices), integers in [8, 1024], got {shape!r}")
    return tuple(int(n) for n in values)  # type: ignore[return-value]


def generate_case(
    profile: SiteProfile, case_index: int, shape: tuple[int, int, int] = DEFAULT_SHAPE, seed: int = 0
) -> SyntheticCase:
    """Generate case ``case_index`` of ``profile``'s site; ``shape`` is (rows, cols, slices)."""
    if isinstance(case_index, bool) or not isinstance(case_index, (int, np.integer)) or case_index < 0:
        raise ValueError(f"case_index must be a non-negative integer, got {case_index!r}")
    case_index = int(case_index)
    shape = check_shape(shape)
    seed = check_seed(seed)
    rng = case_rng(seed, profile.site_id, case_index)
    grade = case_grade(profile, case_index, seed)
    study_datetime = _FIRST_STUDY_DAY + timedelta(
        days=int(rng.integers(0, 730)), minutes=5 * int(rng.integers(0, 120))
    )
    geometry = centred_geometry(
        shape,
        pixel_spacing=profile.pixel_spacing_mm,
        slice_thickness=profile.slice_thickness_mm,
        orientation=profile.orientation,
        centre=tuple(np.round(rng.normal(0.0, 4.0, size=3), 1)),
    )
    enhancement = float(rng.uniform(*profile.enhancement))
    if grade == "LGG":
        enhancement *= 0.5
    phantom = make_phantom(
        rng,
        geometry,
        grade=grade,
        tumour_radius_mm=profile.tumour_radius_mm,
        enhancing_fraction=profile.enhancing_fraction,
    )
    images = render_images(rng, phantom, geometry, profile, enhancement=enhancement)
    return SyntheticCase(
        profile=profile,
        case_index=case_index,
        seed=seed,
        grade=grade,
        images=images,
        label=phantom.label,
        geometry=geometry,
        study_datetime=study_datetime,
        tumour_radius_mm=phantom.tumour_radius_mm,
        enhancement=enhancement,
    )
