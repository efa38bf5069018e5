"""MR contrasts of a :class:`~jipfed.imaging.synth.phantom.Phantom`: stored 16-bit pixel values.

Per case, every tissue's signal is jittered, the lesion contrast is pulled towards normal brain by
a random per-channel conspicuity (some cases are subtle in some channels), and enhancement is
drawn from the site's range. Then: smooth texture, a point-spread blur (partial volume), a smooth
multiplicative bias field (shared by the series, plus a per-series part), a per-series scanner
gain, Rician noise, and rounding to 16-bit integers. Background (outside the head) is exactly 0.
So no single channel separates the tumour by a threshold: oedema and grey matter overlap on
FLAIR/T2 under bias and noise, necrosis is dark on FLAIR, and weak enhancement hides label 3.
"""

from __future__ import annotations

import numpy as np

from jipfed.imaging.synth import phantom as ph
from jipfed.imaging.synth.geometry import SliceGeometry
from jipfed.imaging.synth.profiles import SiteProfile

#: Channel order of :attr:`SyntheticCase.images` and of the converted image.
CHANNELS = ("FLAIR", "T1", "T1c", "T2")
_T1, _T1C = CHANNELS.index("T1"), CHANNELS.index("T1c")

#: Relative signal per tissue code (rows, see :data:`phantom.TISSUE_NAMES`) and channel
#: (FLAIR, T1, T1c, T2); normal white matter on T1 = 1. Parenchyma mixes grey and white matter.
BASE_CONTRAST = np.array(
    [
        [0.00, 0.00, 0.00, 0.00],  # background
        [0.80, 1.10, 1.12, 0.85],  # scalp
        [0.06, 0.08, 0.08, 0.06],  # skull
        [0.18, 0.28, 0.30, 1.55],  # CSF
        [0.00, 0.00, 0.00, 0.00],  # parenchyma: WHITE_MATTER / GREY_MATTER mix
        [1.25, 0.62, 0.64, 1.20],  # oedema
        [1.10, 0.55, 0.58, 1.10],  # non-enhancing tumour
        [0.55, 0.35, 0.38, 1.40],  # necrosis
        [1.05, 0.62, 0.62, 0.95],  # enhancing tumour (T1c: T1 x (1 + enhancement))
    ]
)
WHITE_MATTER = np.array([0.75, 1.00, 1.00, 0.55])
GREY_MATTER = np.array([0.90, 0.72, 0.74, 0.78])
_LESIONS = (ph.EDEMA, ph.CORE, ph.NECROSIS, ph.ENHANCING)
_CONSPICUITY = (0.45, 1.0)


def contrast_table(
    rng: np.random.Generator, *, enhancement: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case's (tissue x channel table, white matter, grey matter) signals, jittered."""
    table = BASE_CONTRAST * np.exp(rng.normal(0.0, 0.05, size=BASE_CONTRAST.shape))
    white = WHITE_MATTER * np.exp(rng.normal(0.0, 0.04, size=4))
    grey = GREY_MATTER * np.exp(rng.normal(0.0, 0.04, size=4))
    reference = (white + grey) / 2
    conspicuity = rng.uniform(*_CONSPICUITY, size=4)
    for tissue in _LESIONS:
        table[tissue] = reference + conspicuity * (table[tissue] - reference)
    table[ph.ENHANCING, _T1C] = table[ph.ENHANCING, _T1] * (1.0 + enhancement)
    return table, white, grey


def render_images(
    rng: np.random.Generator,
    phantom: ph.Phantom,
    geometry: SliceGeometry,
    profile: SiteProfile,
    *,
    enhancement: float,
) -> np.ndarray:
    """(4, n_slices, rows, cols) stored pixel values (uint16, or int16 if ``profile.pixel_signed``)."""
    table, white, grey = contrast_table(rng, enhancement=enhancement)
    tissue, wm = phantom.tissue, phantom.white_matter
    images = np.moveaxis(table[tissue], -1, 0).astype(np.float32)
    brain_signal = wm[None] * white[:, None, None, None] + (1 - wm[None]) * grey[:, None, None, None]
    parenchyma = tissue == ph.PARENCHYMA
    images[:, parenchyma] = brain_signal[:, parenchyma]
    edema = tissue == ph.EDEMA
    reference = ((white + grey) / 2)[:, None]
    images[:, edema] += 0.3 * (brain_signal[:, edema] - reference)

    shape = geometry.shape
    fine = tuple(2.0 / s for s in geometry.spacing)
    lesion_texture = ph.smooth_noise(rng, shape, fine)
    lesion = phantom.label > 0
    coarse = tuple(45.0 / s for s in geometry.spacing)
    shared_bias = ph.smooth_noise(rng, shape, coarse)
    psf = (0.45, 0.6, 0.6)
    head = tissue != ph.BACKGROUND
    gains = np.exp(rng.normal(0.0, 0.1, size=4))
    sigma = profile.noise_level * profile.intensity_scale
    for channel in range(4):
        image = images[channel]
        image *= np.exp(0.03 * ph.smooth_noise(rng, shape, fine))
        image[lesion] *= np.exp(0.07 * lesion_texture[lesion])
        image = ph.gaussian_blur(image, psf)
        log_bias = 0.9 * shared_bias + 0.45 * ph.smooth_noise(rng, shape, coarse)
        image *= np.exp(profile.bias_strength * log_bias)
        image *= profile.intensity_scale * gains[channel]
        real = image + rng.normal(0.0, sigma, size=shape)
        imaginary = rng.normal(0.0, sigma, size=shape)
        image = np.sqrt(real**2 + imaginary**2)
        image[~head] = 0.0
        images[channel] = image
    dtype = np.int16 if profile.pixel_signed else np.uint16
    return np.clip(np.rint(images), 0, np.iinfo(dtype).max).astype(dtype)
