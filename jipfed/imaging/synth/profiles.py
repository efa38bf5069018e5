"""Per-site scanner and population profiles for the synthetic data set.

A :class:`SiteProfile` fixes everything that differs between sites: how many cases, scanner
(vendor strings, field strength, intensity scale, bias field, noise), acquisition geometry
(voxel spacing, orientation) and population (tumour size, share of high-grade cases, share of the
tumour core that enhances, enhancement strength). :func:`default_site_profiles` builds a
heterogeneous (or, for comparison, homogeneous) set of them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

ORIENTATIONS = ("axial", "sagittal", "coronal", "oblique")
_SITE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class SiteProfile:
    """What one synthetic site looks like; validated when built.

    Args:
        site_id: lower-case id such as ``"site-a"`` (letters, digits, ``-``; at most 32).
        n_cases: number of cases (patients, one study each) at this site, >= 1.
        manufacturer, model_name: scanner strings written to the MR headers.
        field_strength_t: MagneticFieldStrength in tesla.
        intensity_scale: stored value of normal white matter on T1 (before bias and noise).
        bias_strength: standard deviation of the log bias field (0 = none; 0.2 is strong).
        noise_level: Rician noise standard deviation relative to ``intensity_scale``.
        pixel_spacing_mm: DICOM PixelSpacing (between rows, between columns) in mm.
        slice_thickness_mm: SliceThickness = SpacingBetweenSlices (contiguous slices) in mm.
        orientation: slice orientation, one of :data:`ORIENTATIONS`.
        tumour_radius_mm: (min, max) of the tumour-core radius drawn per case, in mm.
        hgg_fraction: share of high-grade (enhancing) cases, in [0, 1].
        enhancing_fraction: (min, max) share of the HGG tumour core that enhances (label 3).
        enhancement: (min, max) relative T1c signal gain of enhancing tumour (weak < 0.3).
        pixel_signed: store int16 (PixelRepresentation 1) instead of uint16.
    """

    site_id: str
    n_cases: int
    manufacturer: str = "Synthetic Imaging"
    model_name: str = "Phantom MR 1"
    field_strength_t: float = 3.0
    intensity_scale: float = 1000.0
    bias_strength: float = 0.1
    noise_level: float = 0.04
    pixel_spacing_mm: tuple[float, float] = (2.0, 2.0)
    slice_thickness_mm: float = 2.5
    orientation: str = "axial"
    tumour_radius_mm: tuple[float, float] = (8.0, 16.0)
    hgg_fraction: float = 0.6
    enhancing_fraction: tuple[float, float] = (0.3, 0.6)
    enhancement: tuple[float, float] = (0.25, 0.9)
    pixel_signed: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.site_id, str) or not _SITE_ID.match(self.site_id):
            raise ValueError(f"site_id must match {_SITE_ID.pattern}, got {self.site_id!r}")
        if isinstance(self.n_cases, bool) or not isinstance(self.n_cases, int) or self.n_cases < 1:
            raise ValueError(f"n_cases must be an integer >= 1, got {self.n_cases!r}")
        for name in ("manufacturer", "model_name"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value) > 64 or "\\" in value:
                raise ValueError(f"{name} must be a non-empty string of <= 64 chars, got {value!r}")
        _positive(self, "field_strength_t", "intensity_scale", "slice_thickness_mm")
        _non_negative(self, "bias_strength", "noise_level")
        if self.bias_strength > 1.0:
            raise ValueError(f"bias_strength must be <= 1, got {self.bias_strength!r}")
        if self.intensity_scale * 3.0 > (32767 if self.pixel_signed else 65535):
            raise ValueError(f"intensity_scale {self.intensity_scale!r} leaves no headroom in 16 bits")
        spacing = _pair(self, "pixel_spacing_mm")
        if min(spacing) <= 0:
            raise ValueError(f"pixel_spacing_mm must be positive, got {self.pixel_spacing_mm!r}")
        if self.orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {self.orientation!r}")
        _range(self, "tumour_radius_mm", low=1.0, high=60.0)
        _range(self, "enhancing_fraction", low=0.05, high=0.95)
        _range(self, "enhancement", low=0.0, high=3.0)
        if not 0.0 <= float(self.hgg_fraction) <= 1.0:
            raise ValueError(f"hgg_fraction must be in [0, 1], got {self.hgg_fraction!r}")
        if not isinstance(self.pixel_signed, bool):
            raise ValueError(f"pixel_signed must be a bool, got {self.pixel_signed!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists)."""
        return {
            name: list(value) if isinstance(value, tuple) else value for name, value in self.__dict__.items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SiteProfile:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _positive(profile: SiteProfile, *names: str) -> None:
    for name in names:
        value = getattr(profile, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")


def _non_negative(profile: SiteProfile, *names: str) -> None:
    for name in names:
        value = getattr(profile, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")


def _pair(profile: SiteProfile, name: str) -> tuple[float, float]:
    value = getattr(profile, name)
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
    ):
        raise ValueError(f"{name} must be a tuple of 2 finite numbers, got {value!r}")
    return float(value[0]), float(value[1])


def _range(profile: SiteProfile, name: str, *, low: float, high: float) -> None:
    lo, hi = _pair(profile, name)
    if not low <= lo <= hi <= high:
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max <= {high}, got {(lo, hi)!r}")


def site_id(index: int) -> str:
    """``site-a`` … ``site-z``, then ``site-aa`` …"""
    if index < 0:
        raise ValueError(f"site index must be >= 0, got {index!r}")
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = _ALPHABET[rest] + letters
    return f"site-{letters}"


#: Heterogeneous site styles, cycled when there are more sites than styles. Relative case-count
#: weights live in the first entry of each pair.
_STYLES: tuple[tuple[float, dict[str, Any]], ...] = (
    (
        1.5,
        dict(
            manufacturer="Synthetic Imaging",
            model_name="Phantom MR 3T",
            field_strength_t=3.0,
            intensity_scale=2400.0,
            bias_strength=0.12,
            noise_level=0.03,
            pixel_spacing_mm=(1.9, 1.9),
            slice_thickness_mm=2.6,
            tumour_radius_mm=(10.0, 18.0),
            hgg_fraction=0.7,
            enhancing_fraction=(0.4, 0.7),
            enhancement=(0.4, 1.0),
        ),
    ),
    (
        0.6,
        dict(
            manufacturer="Virtual Magnetics",
            model_name="VM Aura 1.5",
            field_strength_t=1.5,
            intensity_scale=650.0,
            bias_strength=0.22,
            noise_level=0.06,
            pixel_spacing_mm=(2.2, 2.2),
            slice_thickness_mm=3.0,
            tumour_radius_mm=(6.0, 12.0),
            hgg_fraction=0.4,
            enhancing_fraction=(0.2, 0.45),
            enhancement=(0.15, 0.6),
        ),
    ),
    (
        0.9,
        dict(
            manufacturer="Phantom Systems",
            model_name="PS Horizon",
            field_strength_t=3.0,
            intensity_scale=1400.0,
            bias_strength=0.08,
            noise_level=0.045,
            pixel_spacing_mm=(2.0, 2.0),
            slice_thickness_mm=2.4,
            tumour_radius_mm=(8.0, 15.0),
            hgg_fraction=0.55,
            enhancing_fraction=(0.3, 0.6),
            enhancement=(0.25, 0.8),
        ),
    ),
    (
        1.2,
        dict(
            manufacturer="Virtual Magnetics",
            model_name="VM Aura 3",
            field_strength_t=3.0,
            intensity_scale=3200.0,
            bias_strength=0.15,
            noise_level=0.035,
            pixel_spacing_mm=(2.1, 2.1),
            slice_thickness_mm=2.8,
            tumour_radius_mm=(12.0, 20.0),
            hgg_fraction=0.8,
            enhancing_fraction=(0.5, 0.8),
            enhancement=(0.5, 1.2),
        ),
    ),
    (
        0.8,
        dict(
            manufacturer="Synthetic Imaging",
            model_name="Phantom MR 1.5T",
            field_strength_t=1.5,
            intensity_scale=900.0,
            bias_strength=0.18,
            noise_level=0.055,
            pixel_spacing_mm=(1.8, 1.8),
            slice_thickness_mm=2.5,
            tumour_radius_mm=(7.0, 13.0),
            hgg_fraction=0.5,
            enhancing_fraction=(0.25, 0.5),
            enhancement=(0.2, 0.7),
        ),
    ),
)


def default_site_profiles(
    n_sites: int = 3,
    cases_per_site: int = 8,
    heterogeneous: bool = True,
    *,
    orientations: Sequence[str] | None = None,
) -> list[SiteProfile]:
    """``n_sites`` profiles ``site-a``, ``site-b``, … with ``n_sites * cases_per_site`` cases in all.

    Heterogeneous sites differ in scanner, spacing, tumour sizes, grade mix and label balance, and
    get unequal case counts (largest-remainder split of the total, at least 1 each). Homogeneous
    sites all use the :class:`SiteProfile` defaults and ``cases_per_site`` cases each.
    ``orientations`` is cycled over the sites (default: all axial).
    """
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 1:
        raise ValueError(f"n_sites must be an integer >= 1, got {n_sites!r}")
    if isinstance(cases_per_site, bool) or not isinstance(cases_per_site, int) or cases_per_site < 1:
        raise ValueError(f"cases_per_site must be an integer >= 1, got {cases_per_site!r}")
    orientations = tuple(orientations) if orientations else ("axial",)
    bad = [o for o in orientations if o not in ORIENTATIONS]
    if bad:
        raise ValueError(f"orientations must be in {ORIENTATIONS}, got {bad!r}")
    styles = [_STYLES[i % len(_STYLES)] for i in range(n_sites)]
    if heterogeneous:
        counts = _split(n_sites * cases_per_site, [weight for weight, _ in styles])
    else:
        counts = [cases_per_site] * n_sites
    profiles = []
    for i, ((_, style), count) in enumerate(zip(styles, counts, strict=True)):
        base = SiteProfile(site_id=site_id(i), n_cases=count, orientation=orientations[i % len(orientations)])
        profiles.append(replace(base, **style) if heterogeneous else base)
    return profiles


def _split(total: int, weights: Sequence[float]) -> list[int]:
    """Largest-remainder split of ``total`` into parts proportional to ``weights``, each >= 1."""
    if total < len(weights):
        raise ValueError(f"cannot give {len(weights)} sites at least one of {total} cases")
    spare = total - len(weights)
    shares = [spare * w / sum(weights) for w in weights]
    counts = [1 + math.floor(s) for s in shares]
    order = sorted(range(len(weights)), key=lambda i: (math.floor(shares[i]) - shares[i], i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


#: Settings of :func:`heterogeneity_profiles`, from identical sites to one large centre and small,
#: very different ones.
HETEROGENEITY_SETTINGS = ("homogeneous", "default", "strong")

#: The strong setting's sites: (relative size, scanner / population). Sizes 8 : 2 : 1.5 : 1; field
#: strengths 3 / 1.5 / 3 / 1.5 T; four orientations; HGG share 0.85 / 0.2 / 0.6 / 0.35; intensity
#: scales 3200 / 500 / 1800 / 800 with bias 0.08 - 0.25 and noise 0.03 - 0.08.
_STRONG: tuple[tuple[float, dict[str, Any]], ...] = (
    (
        8.0,
        dict(
            manufacturer="Synthetic Imaging",
            model_name="Phantom MR 3T",
            field_strength_t=3.0,
            intensity_scale=3200.0,
            bias_strength=0.08,
            noise_level=0.03,
            pixel_spacing_mm=(1.8, 1.8),
            slice_thickness_mm=2.4,
            orientation="axial",
            tumour_radius_mm=(12.0, 20.0),
            hgg_fraction=0.85,
            enhancing_fraction=(0.5, 0.8),
            enhancement=(0.6, 1.2),
        ),
    ),
    (
        2.0,
        dict(
            manufacturer="Virtual Magnetics",
            model_name="VM Aura 1.5",
            field_strength_t=1.5,
            intensity_scale=500.0,
            bias_strength=0.25,
            noise_level=0.08,
            pixel_spacing_mm=(2.4, 2.4),
            slice_thickness_mm=3.2,
            orientation="sagittal",
            tumour_radius_mm=(6.0, 11.0),
            hgg_fraction=0.2,
            enhancing_fraction=(0.15, 0.35),
            enhancement=(0.1, 0.4),
        ),
    ),
    (
        1.5,
        dict(
            manufacturer="Phantom Systems",
            model_name="PS Horizon",
            field_strength_t=3.0,
            intensity_scale=1800.0,
            bias_strength=0.15,
            noise_level=0.05,
            pixel_spacing_mm=(2.0, 2.0),
            slice_thickness_mm=2.6,
            orientation="coronal",
            tumour_radius_mm=(9.0, 16.0),
            hgg_fraction=0.6,
            enhancing_fraction=(0.3, 0.6),
            enhancement=(0.3, 0.9),
        ),
    ),
    (
        1.0,
        dict(
            manufacturer="Synthetic Imaging",
            model_name="Phantom MR 1.5T",
            field_strength_t=1.5,
            intensity_scale=800.0,
            bias_strength=0.2,
            noise_level=0.065,
            pixel_spacing_mm=(2.2, 2.2),
            slice_thickness_mm=3.0,
            orientation="oblique",
            tumour_radius_mm=(7.0, 13.0),
            hgg_fraction=0.35,
            enhancing_fraction=(0.2, 0.5),
            enhancement=(0.2, 0.7),
        ),
    ),
)


def heterogeneity_profiles(setting: str, smallest: int = 4) -> list[SiteProfile]:
    """Profiles of one of :data:`HETEROGENEITY_SETTINGS`.

    ``homogeneous``: 3 identical default sites of ``2 * smallest`` cases; ``default``: the 3
    heterogeneous :func:`default_site_profiles` with the same total; ``strong``: 4 sites of
    ``8 / 2 / 1.5 / 1 x smallest`` cases (size skew 1:8) with different field strengths,
    intensity scales, bias, noise, spacing, orientations, tumour sizes and grade mixes.
    """
    if isinstance(smallest, bool) or not isinstance(smallest, int) or smallest < 1:
        raise ValueError(f"smallest must be an integer >= 1, got {smallest!r}")
    if setting == "homogeneous":
        return default_site_profiles(3, 2 * smallest, heterogeneous=False)
    if setting == "default":
        return default_site_profiles(3, 2 * smallest, heterogeneous=True)
    if setting != "strong":
        raise ValueError(f"setting must be one of {HETEROGENEITY_SETTINGS}, got {setting!r}")
    return [
        replace(SiteProfile(site_id=site_id(i), n_cases=max(1, round(weight * smallest))), **style)
        for i, (weight, style) in enumerate(_STRONG)
    ]
