"""MONAI preprocessing of converted cases into a cache keyed by config hash and content hash.

Input, one converted case (``docs/architecture.md``)::

    <nifti_root>/<case_key>/image.nii.gz   4-D (X, Y, Z, C), C = FLAIR, T1, T1c, T2
    <nifti_root>/<case_key>/label.nii.gz   3-D uint8 in 0..3, same affine
    <nifti_root>/<case_key>/case.json      {"case_key", "channels", "grade", "content_hash", ...}

Output::

    <cache_root>/<config_hash>/<case_key>.npz   image (C, X, Y, Z) float32, label (1, X, Y, Z) uint8,
                                                affine (4, 4) float64 (voxel -> RAS mm)
    <cache_root>/<config_hash>/index.json       [{case_key, file, grade, content_hash}, ...]
    <cache_root>/<config_hash>/config.json      the config that produced the folder

A case is processed again only when its ``content_hash`` differs from the one in the index (or its
file is missing); a new config gives a new folder. Files are written to a temporary name and
renamed, so a crash never leaves a half-written case or index behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

logger = logging.getLogger(__name__)

#: Bumped whenever the transform chain changes meaning, so old caches are not reused.
PIPELINE_VERSION = 1
CHANNELS = ("FLAIR", "T1", "T1c", "T2")
MAX_LABEL = 3
INDEX_FILE = "index.json"
CONFIG_FILE = "config.json"
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: RAS+ axis labels, passed explicitly (MONAI's default is changing to the MetaTensor's space).
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class PreprocessConfig:
    """What the preprocessing does; its hash names the cache folder.

    Defaults suit the synthetic cases (64 x 64 x 40 voxels of about 1-3 mm, a head of roughly
    110 x 110 x 90 mm): 2 mm isotropic voxels keep the whole head in a (64, 64, 48) box
    (128 x 128 x 96 mm), every axis a multiple of 8 as the U-Net presets need, and about 200 k
    voxels per channel, small enough for CPU training.

    Args:
        spacing_mm: output voxel size along (X, Y, Z) of the RAS grid, in mm.
        spatial_size: output shape (X, Y, Z) in voxels; cropped or zero-padded around the centre.
        crop_foreground: crop to the bounding box of nonzero image voxels (the head) before
            padding / cropping to ``spatial_size``, so the head is centred.
        channels: expected channel order of ``image.nii.gz`` (checked against case.json).
        normalization: ``"zscore_nonzero"``: per channel, nonzero voxels to mean 0 and standard
            deviation 1 (background stays 0). The only option for now.
    """

    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)
    spatial_size: tuple[int, int, int] = (64, 64, 48)
    crop_foreground: bool = True
    channels: tuple[str, ...] = CHANNELS
    normalization: str = "zscore_nonzero"

    def __post_init__(self) -> None:
        spacing = tuple(float(s) for s in self.spacing_mm)
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing_mm must be 3 positive numbers, got {self.spacing_mm!r}")
        size = tuple(self.spatial_size)
        if len(size) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
            raise ValueError(f"spatial_size must be 3 positive integers, got {self.spatial_size!r}")
        channels = tuple(self.channels)
        if not channels or len(set(channels)) != len(channels):
            raise ValueError(f"channels must be non-empty and distinct, got {self.channels!r}")
        if self.normalization != "zscore_nonzero":
            raise ValueError(f"normalization must be 'zscore_nonzero', got {self.normalization!r}")
        # normalise sequence types so equal configs hash equally
        object.__setattr__(self, "spacing_mm", spacing)
        object.__setattr__(self, "spatial_size", size)
        object.__setattr__(self, "channels", channels)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus the pipeline version."""
        data = asdict(self)
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
        data["pipeline_version"] = PIPELINE_VERSION
        return data

    def config_hash(self) -> str:
        """First 12 hex digits of sha256 over the canonical JSON of :meth:`to_dict`."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class PreprocessReport:
    """Outcome of one :func:`preprocess_cases` call.

    ``processed`` + ``cached`` cases are in the index; ``failed`` lists (case_key or folder name,
    reason) for the others.
    """

    processed: int
    cached: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    out_dir: Path = Path()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "processed": self.processed,
            "cached": self.cached,
            "failed": [list(item) for item in self.failed],
            "out_dir": str(self.out_dir),
        }


@dataclass(frozen=True)
class CaseInfo:
    """The fields of a case.json that preprocessing uses."""

    case_key: str
    channels: tuple[str, ...]
    grade: str | None
    content_hash: str


def read_case_info(case_dir: Path) -> CaseInfo:
    """Read and check ``<case_dir>/case.json``; the key must equal the folder name."""
    path = case_dir / "case.json"
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    key, channels, content_hash = data.get("case_key"), data.get("channels"), data.get("content_hash")
    grade = data.get("grade")
    if not isinstance(key, str) or not _SAFE_KEY.match(key):
        raise ValueError(f"{path}: case_key must be a plain file name, got {key!r}")
    if key != case_dir.name:
        raise ValueError(f"{path}: case_key {key!r} does not match folder name {case_dir.name!r}")
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise ValueError(f"{path}: channels must be a list of strings, got {channels!r}")
    if not isinstance(content_hash, str) or not content_hash:
        raise ValueError(f"{path}: content_hash must be a non-empty string, got {content_hash!r}")
    if grade is not None and not isinstance(grade, str):
        raise ValueError(f"{path}: grade must be a string or null, got {grade!r}")
    return CaseInfo(key, tuple(channels), grade, content_hash)


def _nonzero(x: Any) -> Any:
    """Foreground selector for CropForegroundd: any channel nonzero."""
    return x != 0


def build_transforms(config: PreprocessConfig) -> Any:
    """MONAI dict transforms: {"image", "label"} file paths -> channel-first MetaTensors.

    Output ``image`` (C, X, Y, Z) float32 z-scored, ``label`` (1, X, Y, Z) float32 holding integer
    values, both on the same RAS grid of ``config.spacing_mm`` and shape ``config.spatial_size``.
    A Compose of two stages, ``(resample, fit)``: load, reorient and resample; then crop / pad to
    the output size and normalise (so a caller can see what the crop removes).
    """
    from monai.transforms import (
        CenterSpatialCropd,
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        Spacingd,
        SpatialPadd,
    )

    keys = ["image", "label"]
    # LoadImaged instantiates every registered reader; the DICOM one warns (and logs) that the
    # GPU codec nvImageCodec is missing, which does not concern NIfTI: keep that out of our logs.
    codec_logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = codec_logger.level
    codec_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            # NibabelReader marks the 4th axis of a 4-D NIfTI as the channel axis; a 3-D label gets one.
            load = LoadImaged(keys=keys, reader="NibabelReader", image_only=True, dtype=np.float32)
    finally:
        codec_logger.setLevel(level)
    resample = [
        load,
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=_RAS_LABELS),
        Spacingd(keys=keys, pixdim=config.spacing_mm, mode=("bilinear", "nearest"), padding_mode="zeros"),
    ]
    fit: list[Any] = []
    if config.crop_foreground:
        fit.append(
            CropForegroundd(keys=keys, source_key="image", select_fn=_nonzero, margin=0, allow_smaller=True)
        )
    fit += [
        SpatialPadd(keys=keys, spatial_size=config.spatial_size, mode="constant"),
        CenterSpatialCropd(keys=keys, roi_size=config.spatial_size),
        # last, so statistics cover exactly the voxels that are kept; padding stays 0
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        EnsureTyped(keys=keys, dtype=np.float32, track_meta=True),
    ]
    return Compose([Compose(resample), Compose(fit)])


def preprocess_case(case_dir: Path, config: PreprocessConfig, transforms: Any | None = None) -> dict:
    """Run the transforms (a :func:`build_transforms` result, built when None) on one case folder.

    Returns ``{"image": (C, X, Y, Z) float32, "label": (1, X, Y, Z) uint8, "affine": (4, 4)
    float64}`` as numpy arrays. Raises ValueError for a case that breaks the input contract.
    """
    import nibabel as nib

    info = read_case_info(case_dir)
    if info.channels != config.channels:
        raise ValueError(f"channels {list(info.channels)} != expected {list(config.channels)}")
    image_path, label_path = case_dir / "image.nii.gz", case_dir / "label.nii.gz"
    image_hdr, label_hdr = nib.load(image_path), nib.load(label_path)
    if image_hdr.ndim != 4 or image_hdr.shape[3] != len(config.channels):
        raise ValueError(f"image must be (X, Y, Z, {len(config.channels)}), got {image_hdr.shape}")
    if label_hdr.shape != image_hdr.shape[:3]:
        raise ValueError(f"label shape {label_hdr.shape} != image grid {image_hdr.shape[:3]}")
    if not np.allclose(image_hdr.affine, label_hdr.affine, atol=1e-3):
        raise ValueError("label affine differs from image affine")
    resample, fit = (build_transforms(config) if transforms is None else transforms).transforms
    resampled = resample({"image": str(image_path), "label": str(label_path)})
    labelled = int((resampled["label"] > 0).sum())
    out = fit(resampled)
    lost = labelled - int((out["label"] > 0).sum())
    if lost > 0:
        logger.warning(
            "case %s: cropping to %s removed %d of %d labelled voxels; use a larger spatial_size",
            info.case_key,
            config.spatial_size,
            lost,
            labelled,
        )
    image = out["image"].numpy().astype(np.float32, copy=False)
    label_f = out["label"].numpy()
    if not np.isfinite(image).all():
        raise ValueError("image contains NaN or inf after preprocessing")
    label = np.rint(label_f)
    if label.min() < 0 or label.max() > MAX_LABEL or not np.allclose(label, label_f, atol=1e-3):
        raise ValueError(f"label values must be integers in 0..{MAX_LABEL}")
    affine = np.asarray(out["image"].affine, dtype=np.float64)
    return {"image": image, "label": label.astype(np.uint8), "affine": affine}


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(binary_file)`` on a temp file next to ``path``, then rename it onto ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: Any) -> None:
    _atomic_write(path, lambda fh: fh.write((json.dumps(data, indent=1) + "\n").encode()))


def load_index(out_dir: str | Path) -> list[dict[str, Any]]:
    """Entries of ``<out_dir>/index.json`` ([] when there is none yet), each
    ``{"case_key", "file", "grade", "content_hash"}``."""
    path = Path(out_dir) / INDEX_FILE
    if not path.is_file():
        return []
    entries = json.loads(path.read_text())
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and {"case_key", "file", "content_hash"} <= set(e) for e in entries
    ):
        raise ValueError(f"{path}: expected a list of {{case_key, file, grade, content_hash}} objects")
    return entries


def preprocess_cases(
    case_dirs: Iterable[str | Path],
    cache_root: str | Path,
    config: PreprocessConfig | None = None,
    progress: bool = True,
) -> PreprocessReport:
    """Preprocess converted case folders into ``<cache_root>/<config_hash>/``, reusing the cache.

    A case is skipped (counted as cached) when the index holds its key with the same
    ``content_hash`` and its file exists. The index is rewritten to list exactly the cases of
    ``case_dirs`` that are now available, sorted by key; files of cases no longer listed stay on
    disk. A failing case is logged and reported, not raised.
    """
    config = PreprocessConfig() if config is None else config
    out_dir = Path(cache_root) / config.config_hash()
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / CONFIG_FILE).is_file():
        _write_json(out_dir / CONFIG_FILE, config.to_dict())
    previous = {e["case_key"]: e for e in load_index(out_dir)}
    entries: dict[str, dict[str, Any]] = {}
    processed, cached, failed = 0, 0, []
    transforms = None
    dirs = sorted(Path(d) for d in case_dirs)
    for case_dir in tqdm(dirs, desc="preprocess", unit="case", disable=not progress):
        try:
            info = read_case_info(case_dir)
        except (OSError, ValueError) as err:
            logger.warning("preprocess: skipping %s: %s", case_dir.name, err)
            failed.append((case_dir.name, f"case.json: {err}"))
            continue
        if info.case_key in entries:
            failed.append((info.case_key, f"duplicate case_key (also in another folder): {case_dir}"))
            continue
        entry = {
            "case_key": info.case_key,
            "file": f"{info.case_key}.npz",
            "grade": info.grade,
            "content_hash": info.content_hash,
        }
        old = previous.get(info.case_key)
        if old and old.get("content_hash") == info.content_hash and (out_dir / entry["file"]).is_file():
            cached += 1
            entries[info.case_key] = entry
            continue
        try:
            if transforms is None:
                transforms = build_transforms(config)
            arrays = preprocess_case(case_dir, config, transforms)
            _atomic_write(out_dir / entry["file"], lambda fh, a=arrays: np.savez(fh, **a))
        except Exception as err:  # one broken case must not stop the site; it is reported
            logger.warning("preprocess: case %s failed: %s: %s", info.case_key, type(err).__name__, err)
            failed.append((info.case_key, f"{type(err).__name__}: {err}"))
            continue
        processed += 1
        entries[info.case_key] = entry
    dropped = sorted(set(previous) - set(entries))
    if dropped:
        logger.info("preprocess: %d case(s) no longer listed in the index: %s", len(dropped), dropped)
    _write_json(out_dir / INDEX_FILE, [entries[k] for k in sorted(entries)])
    report = PreprocessReport(processed=processed, cached=cached, failed=failed, out_dir=out_dir)
    logger.info("preprocess %s: %d processed, %d cached, %d failed", out_dir, processed, cached, len(failed))
    return report
