"""Head and tumour phantom on a voxel grid: tissue map, white-matter weight and BraTS labels.

Everything is built from voxel-centre coordinates in patient space (mm), so a site's spacing and
orientation change how the same kind of anatomy is sampled, not the anatomy itself. The head is an
ellipsoid (scalp, skull, CSF rim, brain with smooth grey/white-matter texture, two ventricles);
the tumour is a union of 1-3 rotated ellipsoids deformed by smooth noise, with oedema growing
preferentially along white matter. Labels follow BraTS 2023: 1 necrotic / non-enhancing core,
2 peritumoral oedema, 3 enhancing tumour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jipfed.imaging.synth.geometry import SliceGeometry

#: Tissue codes of :attr:`Phantom.tissue`; their contrasts live in :mod:`.contrast`.
BACKGROUND, SCALP, SKULL, CSF, PARENCHYMA, EDEMA, CORE, NECROSIS, ENHANCING = range(9)
TISSUE_NAMES = ("background", "scalp", "skull", "csf", "parenchyma", "edema", "core", "necrosis", "enhancing")
#: Label values (= SEG segment numbers).
LABEL_CORE, LABEL_EDEMA, LABEL_ENHANCING = 1, 2, 3

#: Nominal head semi-axes (left-right, anterior-posterior, superior-inferior) in mm.
HEAD_SEMI_AXES_MM = (52.0, 60.0, 46.0)
#: Radii (as a fraction of the head ellipsoid) of the scalp/skull, skull/CSF and CSF/brain borders.
_SKULL_IN, _CSF_IN, _BRAIN_IN = 0.93, 0.87, 0.83
_FIT_MARGIN = 0.92  # head half-extent <= this share of the half field of view


@dataclass(frozen=True, eq=False)
class Phantom:
    """Tissue model of one case on the geometry's (n_slices, rows, cols) grid."""

    tissue: np.ndarray  # uint8 tissue code per voxel
    white_matter: np.ndarray  # float32 in [0, 1], grey (0) to white (1) matter weight
    label: np.ndarray  # uint8 BraTS label per voxel
    head_scale: float  # anatomy shrink factor that made the head fit the field of view
    tumour_radius_mm: float  # drawn core radius after ``head_scale``


def smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: tuple[float, ...]
) -> np.ndarray:
    """Gaussian-filtered white noise (periodic, via FFT), rescaled to mean 0 and std 1; float32."""
    white = rng.standard_normal(shape)
    spectrum = np.fft.rfftn(white)
    freqs = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    kernel = np.ones(spectrum.shape)
    for axis, (f, sigma) in enumerate(zip(freqs, sigma_vox, strict=True)):
        view = [1] * len(shape)
        view[axis] = f.size
        kernel = kernel * np.exp(-2.0 * (np.pi * f * sigma) ** 2).reshape(view)
    field = np.fft.irfftn(spectrum * kernel, s=shape, axes=tuple(range(len(shape))))
    std = field.std()
    return ((field - field.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def gaussian_blur(volume: np.ndarray, sigma_vox: tuple[float, ...]) -> np.ndarray:
    """Periodic Gaussian blur of a 3-D float volume via FFT (a scanner's point-spread function)."""
    spectrum = np.fft.rfftn(volume)
    shape = volume.shape
    freqs = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    for axis, (f, sigma) in enumerate(zip(freqs, sigma_vox, strict=True)):
        view = [1] * len(shape)
        view[axis] = f.size
        spectrum = spectrum * np.exp(-2.0 * (np.pi * f * sigma) ** 2).reshape(view)
    return np.fft.irfftn(spectrum, s=shape, axes=tuple(range(len(shape)))).astype(np.float32)


def _sigma_vox(geometry: SliceGeometry, sigma_mm: float) -> tuple[float, float, float]:
    return tuple(sigma_mm / step for step in geometry.spacing)  # type: ignore[return-value]


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _random_direction(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def head_fit_scale(geometry: SliceGeometry, semi_axes: np.ndarray) -> float:
    """Factor <= 1 that shrinks an axis-aligned head ellipsoid to fit the field of view."""
    scale = 1.0
    half_fov = np.array(geometry.shape) * np.array(geometry.spacing) / 2
    for axis, half in zip(geometry.axes, half_fov, strict=True):
        extent = float(np.sqrt(((semi_axes * axis) ** 2).sum()))
        scale = min(scale, _FIT_MARGIN * half / extent)
    return scale


def make_phantom(
    rng: np.random.Generator,
    geometry: SliceGeometry,
    *,
    grade: str,
    tumour_radius_mm: tuple[float, float],
    enhancing_fraction: tuple[float, float],
) -> Phantom:
    """Draw one head with one tumour (``grade`` "HGG": necrosis + enhancing rim; "LGG": mostly not)."""
    if grade not in ("HGG", "LGG"):
        raise ValueError(f"grade must be 'HGG' or 'LGG', got {grade!r}")
    shape = geometry.shape
    centres = geometry.voxel_centres().astype(np.float32)

    semi_axes = np.array(HEAD_SEMI_AXES_MM) * rng.uniform(0.94, 1.06, size=3)
    scale = head_fit_scale(geometry, semi_axes)
    semi_axes = semi_axes * scale
    head_centre = rng.normal(0.0, 2.0, size=3) * scale
    q = (centres - head_centre) / semi_axes
    rho = np.sqrt((q**2).sum(-1))
    rho_wobbly = rho * (1 + 0.015 * smooth_noise(rng, shape, _sigma_vox(geometry, 8.0)))

    tissue = np.zeros(shape, np.uint8)
    tissue[rho < 1.0] = SCALP
    tissue[rho_wobbly < _SKULL_IN] = SKULL
    tissue[rho_wobbly < _CSF_IN] = CSF
    parenchyma = rho_wobbly < _BRAIN_IN
    ventricle_size = rng.uniform(0.8, 1.3)
    for side in (-1.0, 1.0):
        offset = np.array([0.1 * side, -0.04, 0.08])
        radii = np.array([0.08, 0.3, 0.15]) * ventricle_size
        parenchyma &= (((q - offset) / radii) ** 2).sum(-1) >= 1.0
    tissue[parenchyma] = PARENCHYMA
    brain = rho_wobbly < _BRAIN_IN

    white_matter = 1 / (
        1 + np.exp(-((0.66 - rho_wobbly) * 14 + 1.1 * smooth_noise(rng, shape, _sigma_vox(geometry, 5.0))))
    )
    white_matter = white_matter.astype(np.float32)

    radius = rng.uniform(*tumour_radius_mm) * scale
    head = _Head(centres, semi_axes, head_centre, brain, parenchyma, white_matter)
    label, lesion = _tumour(rng, geometry, head, radius, grade=grade, enhancing_fraction=enhancing_fraction)
    tissue[label > 0] = lesion[label > 0]
    return Phantom(
        tissue=tissue, white_matter=white_matter, label=label, head_scale=scale, tumour_radius_mm=radius
    )


@dataclass(frozen=True, eq=False)
class _Head:
    """What the tumour model needs of the head."""

    centres: np.ndarray  # (n_slices, rows, cols, 3) voxel centres, mm
    semi_axes: np.ndarray  # (3,) head ellipsoid, mm
    centre: np.ndarray  # (3,) head centre, mm
    brain: np.ndarray  # bool, inside the CSF rim
    parenchyma: np.ndarray  # bool, brain minus ventricles
    white_matter: np.ndarray  # float32 white-matter weight


def _tumour(
    rng: np.random.Generator,
    geometry: SliceGeometry,
    head: _Head,
    radius: float,
    *,
    grade: str,
    enhancing_fraction: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """(label, lesion tissue code) volumes for one tumour of core radius ``radius`` mm in the brain.

    HGG: the outer ``enhancing_fraction`` of the core (by volume, drawn per case) enhances, with
    a few gaps; the rest is necrosis. LGG: non-enhancing core, in a quarter of cases with a small
    enhancing focus. A core too small to split (under 2 voxels) gets no enhancement.
    """
    shape = geometry.shape
    centres, brain, parenchyma = head.centres, head.brain, head.parenchyma
    reach = _BRAIN_IN * 0.85 - radius / float(head.semi_axes.min())
    radial = rng.uniform(0.15, 1.0) * max(reach, 0.0)
    centre = head.centre + head.semi_axes * _random_direction(rng) * radial

    n_lobes = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    distance = np.full(shape, np.inf, np.float32)
    for lobe in range(n_lobes):
        lobe_centre = (
            centre if lobe == 0 else centre + _random_direction(rng) * radius * rng.uniform(0.35, 0.75)
        )
        lobe_axes = radius * (
            rng.uniform(0.75, 1.25, size=3) if lobe == 0 else rng.uniform(0.45, 0.8, size=3)
        )
        local = (centres - lobe_centre) @ _random_rotation(rng)
        distance = np.minimum(distance, np.sqrt(((local / lobe_axes) ** 2).sum(-1)))

    core_field = distance + 0.18 * smooth_noise(rng, shape, _sigma_vox(geometry, max(radius / 2, 2.0)))
    edema_ratio = rng.uniform(1.3, 1.9)
    edema_field = (
        distance / edema_ratio
        + 0.22 * smooth_noise(rng, shape, _sigma_vox(geometry, 4.0))
        - 0.15 * (head.white_matter - 0.5)
    )
    core = (core_field < 1.0) & brain
    whole = ((edema_field < 1.0) & parenchyma) | core

    label = np.zeros(shape, np.uint8)
    lesion = np.zeros(shape, np.uint8)
    label[whole] = LABEL_EDEMA
    lesion[whole] = EDEMA
    label[core] = LABEL_CORE
    lesion[core] = CORE
    gaps = smooth_noise(rng, shape, _sigma_vox(geometry, 3.0)) < -1.0
    if grade == "HGG" and core.sum() >= 2:
        fraction = rng.uniform(*enhancing_fraction)
        threshold = np.quantile(core_field[core], 1.0 - fraction)
        enhancing = core & (core_field >= threshold)
        enhancing &= ~gaps
        if not enhancing.any():
            enhancing = core & (core_field >= threshold)
        label[enhancing] = LABEL_ENHANCING
        lesion[enhancing] = ENHANCING
        necrosis = core & (core_field < threshold)
        lesion[necrosis] = NECROSIS
    elif grade == "LGG" and rng.uniform() < 0.25 and core.any():
        seed_voxel = np.argwhere(core)[rng.integers(core.sum())]
        focus = np.sqrt(((centres - centres[tuple(seed_voxel)]) ** 2).sum(-1)) < 0.3 * radius
        label[focus & core] = LABEL_ENHANCING
        lesion[focus & core] = ENHANCING
    return label, lesion
