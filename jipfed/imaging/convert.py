"""Fetched DICOM study → converted NIfTI case (image, label, case.json), with a per-run report.

Input (one study, ``docs/architecture.md``)::

    <data_root>/dicom/<StudyInstanceUID>/<SeriesInstanceUID>/*.dcm

Series are classified by their headers: Modality SEG → the label; MR series → channels by
SeriesDescription (``channel_map``, case-insensitive exact match); other series are ignored and
logged; stray non-image objects inside a series are left out and reported. Compressed, deflated,
big-endian and multi-frame (Enhanced MR) series are accepted: every frame is decoded once as a
check (:mod:`jipfed.imaging.series_check`) and files dcm2niix cannot read are normalised first
(:mod:`jipfed.imaging.staging`). Skip reasons name the series by number and description; the
full dcm2niix output goes to the log. Output::

    <out_root>/<case_key>/image.nii.gz  4-D (X, Y, Z, C) int16 (float32 when values need it),
                                        C in ``channel_map`` order (FLAIR, T1, T1c, T2)
    <out_root>/<case_key>/label.nii.gz  3-D uint8, the image's affine, values = SEG segment numbers
    <out_root>/<case_key>/case.json     case_key, channels, grade, content_hash, label_values,
                                        shape (X, Y, Z), spacing (mm), converter
    <out_root>/reports/convert-<UTC timestamp>.json

``case_key`` is the first 16 hex digits of sha256(StudyInstanceUID). case.json holds no UID and no
patient attribute; the run report names series folders (hence UIDs) and must stay on site.
``content_hash`` is sha256 over every series folder name, file name and file content: a case whose
hash and ``converter`` settings are unchanged is not converted again. A case is written to a
temporary folder beside its final place and renamed, so a crash never leaves half a case.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from pydicom.multival import MultiValue

from jipfed.imaging.dicom_io import read_instance, short_error
from jipfed.imaging.seg_labels import RAS_TO_LPS, SegRejected, seg_label_map, signed_permutation
from jipfed.imaging.series_check import (
    SeriesInfo,
    SeriesRejected,
    check_series,
    instance_files,
    is_hidden,
)
from jipfed.imaging.staging import stage_series

logger = logging.getLogger(__name__)

#: Bumped whenever the conversion changes meaning, so cached cases are converted again.
CONVERTER_VERSION = 2
#: Channel → accepted SeriesDescriptions (lower case); the order is the image's channel order.
DEFAULT_CHANNEL_MAP: Mapping[str, tuple[str, ...]] = {
    "FLAIR": ("flair",),
    "T1": ("t1",),
    "T1c": ("t1c", "t1ce", "t1gd", "t1-ce", "t1 post"),
    "T2": ("t2",),
}
AFFINE_TOL = 1e-4  # mm, between channels and between image and label
CASE_FILES = ("image.nii.gz", "label.nii.gz", "case.json")
REPORTS_DIR = "reports"
_HASH_CHUNK = 1 << 20


class CaseRejected(Exception):
    """A case that cannot be converted: the folder at fault (series or study) and the reason."""

    def __init__(self, folder: Path, reason: str) -> None:
        super().__init__(f"{folder}: {reason}")
        self.folder = Path(folder)
        self.reason = reason


class Dcm2niixError(RuntimeError):
    """dcm2niix failed on a series (non-zero exit, with its stderr, or unexpected output)."""


@dataclass(frozen=True)
class ConvertedCase:
    """One converted (or cached) case; ``ignored`` lists (series folder or file, reason) left out:
    series mapping to no channel, and stray objects (SR, presentation states, ...) in a series."""

    case_key: str
    case_dir: Path
    channels: tuple[str, ...]
    grade: str | None
    content_hash: str
    label_values: tuple[int, ...]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    cached: bool = False
    ignored: tuple[tuple[str, str], ...] = ()


@dataclass
class ConversionReport:
    """What one run did. Holds local series folder paths (UIDs): never send it off site.

    ``skipped`` and ``ignored`` are (case_key, folder, reason); ``ignored`` lists series left out
    of the cases converted in this run (a cached case is not examined again).
    """

    out_root: str
    started: str
    finished: str = ""
    converted: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str, str]] = field(default_factory=list)
    report_file: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (tuples become lists)."""
        data = asdict(self)
        data["local_only"] = "contains series folder paths (StudyInstanceUID/SeriesInstanceUID)"
        return data


def case_key_for(study_uid: str) -> str:
    """Pseudonymous case key: the first 16 hex digits of sha256(StudyInstanceUID)."""
    return hashlib.sha256(study_uid.encode()).hexdigest()[:16]


def content_hash(study_dir: Path) -> str:
    """sha256 over the case's series folder names, instance file names and file contents (sorted)."""
    digest = hashlib.sha256()
    for series_dir in _series_dirs(study_dir):
        for path in instance_files(series_dir):
            digest.update(f"{series_dir.name}/{path.name}\0{path.stat().st_size}\0".encode())
            with path.open("rb") as fh:
                while chunk := fh.read(_HASH_CHUNK):
                    digest.update(chunk)
    return digest.hexdigest()


def converter_key(channel_map: Mapping[str, Sequence[str]]) -> str:
    """Short hash of the settings that shape the output (converter version, channel map)."""
    payload = json.dumps(
        {"version": CONVERTER_VERSION, "channels": {k: list(v) for k, v in channel_map.items()}}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def find_dcm2niix() -> str:
    """Path of the dcm2niix binary: on PATH, else next to the running Python (a venv's bin)."""
    found = shutil.which("dcm2niix") or shutil.which("dcm2niix", path=str(Path(sys.executable).parent))
    if found is None:
        raise FileNotFoundError("dcm2niix not found on PATH nor next to the Python interpreter")
    return found


def run_dcm2niix(
    series_dir: Path, out_dir: Path, name: str, binary: str | None = None, label: str | None = None
) -> Path:
    """Convert one single-series folder with dcm2niix; return the one .nii.gz it wrote.

    On failure the full dcm2niix output goes to the log; the error carries its exit code and its
    last error or warning line, whole (``label`` names the series, default the folder name).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [binary or find_dcm2niix(), "-z", "y", "-b", "n", "-f", name, "-o", str(out_dir), str(series_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        logger.warning(
            "dcm2niix exited with %d on %s; its output:\n%s", proc.returncode, series_dir, proc.stdout + proc.stderr
        )
        raise Dcm2niixError(
            f"dcm2niix exited with {proc.returncode} on {label or series_dir.name}: "
            f"{dcm2niix_reason(proc.stdout + proc.stderr)}"
        )
    outputs = sorted(out_dir.glob(f"{name}*.nii.gz"))
    if len(outputs) != 1:
        raise Dcm2niixError(
            f"dcm2niix wrote {[p.name for p in outputs]} for {series_dir.name}, expected one file"
        )
    return outputs[0]


def dcm2niix_reason(output: str) -> str:
    """The last whole error (else warning, else any) line of dcm2niix's output, at most 300 chars."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for marker in ("error", "warning"):
        found = [line for line in lines if marker in line.lower()]
        if found:
            lines = found
            break
    if not lines:
        return "no output"
    line = lines[-1]
    return line if len(line) <= 300 else line[:300].rsplit(" ", 1)[0] + " ..."


def convert_case(
    study_dir: Path,
    out_root: Path,
    channel_map: Mapping[str, Sequence[str]] = DEFAULT_CHANNEL_MAP,
    *,
    dcm2niix: str | None = None,
) -> ConvertedCase:
    """Convert one study folder into ``<out_root>/<case_key>/``, or reuse it when unchanged.

    Raises:
        CaseRejected: corrupt or incomplete input, or dcm2niix failing on a series (the folder at
            fault and why).
    """
    study_dir, out_root = Path(study_dir), Path(out_root)
    lookup = _channel_lookup(channel_map)
    key = case_key_for(study_dir.name)
    digest, settings = content_hash(study_dir), converter_key(channel_map)
    cached = _cached_case(out_root / key, digest, settings)
    if cached is not None:
        return cached
    infos = _check_all(study_dir)
    channels, seg, ignored = _classify(study_dir, infos, lookup, tuple(channel_map))
    ignored += [(str(info.folder / name), reason) for info in infos for name, reason in info.left_out]
    out_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=out_root))
    try:
        image, affine = _convert_channels(study_dir, channels, work, dcm2niix or find_dcm2niix())
        try:
            label = seg_label_map(
                seg.files[0],
                affine,
                image.shape[:3],
                frame_of_reference_uid=channels[0].frame_of_reference_uid or "",
                source_sop_instance_uids={
                    uid for info in infos if not info.is_segmentation for uid in info.sop_instance_uids
                },
            )
        except SegRejected as exc:
            raise CaseRejected(seg.folder, f"{seg.label}: {exc.reason}") from exc
        result = ConvertedCase(
            case_key=key,
            case_dir=out_root / key,
            channels=tuple(channel_map),
            grade=_grade(channels[0]),
            content_hash=digest,
            label_values=tuple(int(v) for v in np.unique(label) if v),
            shape=tuple(int(n) for n in image.shape[:3]),  # type: ignore[arg-type]
            spacing=tuple(round(float(np.linalg.norm(affine[:3, i])), 6) for i in range(3)),  # type: ignore[arg-type]
            ignored=tuple(ignored),
        )
        staged = work / "case"
        _write_case(staged, image, label, affine, result, settings)
        _place(staged, out_root / key)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info(
        "converted case %s (%s, labels %s)", key, "x".join(map(str, result.shape)), result.label_values
    )
    return result


def convert_cases(
    study_dirs: Iterable[Path],
    out_root: Path,
    channel_map: Mapping[str, Sequence[str]] = DEFAULT_CHANNEL_MAP,
) -> ConversionReport:
    """Convert many study folders; a rejected case is reported and the others go on.

    The report is written to ``<out_root>/reports/convert-<UTC timestamp>.json`` and logged.
    """
    out_root = Path(out_root)
    _channel_lookup(channel_map)  # a bad channel map is a configuration error: fail before any case
    binary = find_dcm2niix()
    report = ConversionReport(out_root=str(out_root), started=_now())
    seen: set[str] = set()
    for study_dir in sorted(Path(d) for d in study_dirs):
        key = case_key_for(study_dir.name)
        if key in seen:
            report.skipped.append((key, str(study_dir), "duplicate case_key in this run"))
            continue
        seen.add(key)
        try:
            case = convert_case(study_dir, out_root, channel_map, dcm2niix=binary)
        except CaseRejected as exc:
            logger.warning("skipping case %s: %s: %s", key, exc.folder, exc.reason)
            report.skipped.append((key, str(exc.folder), exc.reason))
            continue
        except Exception as exc:  # noqa: BLE001 - one broken case never stops the batch
            logger.exception("skipping case %s: unexpected error converting %s", key, study_dir)
            report.skipped.append((key, str(study_dir), f"unexpected error ({short_error(exc)})"))
            continue
        (report.cached if case.cached else report.converted).append(key)
        report.ignored.extend((key, folder, reason) for folder, reason in case.ignored)
    report.finished = _now()
    path = out_root / REPORTS_DIR / f"convert-{report.started}.json"
    report.report_file = str(path)
    _write_json(path, report.to_dict())
    logger.info(
        "conversion: %d converted, %d cached, %d skipped, %d series ignored; report %s",
        len(report.converted),
        len(report.cached),
        len(report.skipped),
        len(report.ignored),
        path,
    )
    return report


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def _series_dirs(study_dir: Path) -> list[Path]:
    if not study_dir.is_dir():
        raise CaseRejected(study_dir, "study folder does not exist")
    return sorted(p for p in study_dir.iterdir() if p.is_dir() and not is_hidden(p))


def _channel_lookup(channel_map: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """SeriesDescription (lower case) → channel; ValueError on an empty or ambiguous map."""
    lookup: dict[str, str] = {}
    for channel, names in channel_map.items():
        if not names:
            raise ValueError(f"channel {channel!r} has no SeriesDescription")
        for name in names:
            norm = name.strip().lower()
            if lookup.setdefault(norm, channel) != channel:
                raise ValueError(f"SeriesDescription {name!r} maps to {lookup[norm]!r} and {channel!r}")
    if not lookup:
        raise ValueError("channel_map is empty")
    return lookup


def _cached_case(case_dir: Path, digest: str, settings: str) -> ConvertedCase | None:
    """The existing case when its content hash and converter settings match, else None."""
    if not all((case_dir / name).is_file() for name in CASE_FILES):
        return None
    try:
        meta = json.loads((case_dir / "case.json").read_text())
        if meta.get("content_hash") != digest or meta.get("converter") != settings:
            return None
        return ConvertedCase(
            case_key=meta["case_key"],
            case_dir=case_dir,
            channels=tuple(meta["channels"]),
            grade=meta["grade"],
            content_hash=digest,
            label_values=tuple(meta["label_values"]),
            shape=tuple(meta["shape"]),
            spacing=tuple(meta["spacing"]),
            cached=True,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable %s/case.json: %s", case_dir, exc)
        return None


def _check_all(study_dir: Path) -> list[SeriesInfo]:
    series_dirs = _series_dirs(study_dir)
    if not series_dirs:
        raise CaseRejected(study_dir, "no series folders")
    infos = []
    for series_dir in series_dirs:
        try:
            info = check_series(series_dir)
        except SeriesRejected as exc:
            raise CaseRejected(exc.folder, exc.reason) from exc
        if info.study_uid != study_dir.name:
            raise CaseRejected(series_dir, f"{info.label}: StudyInstanceUID differs from the study folder name")
        infos.append(info)
    return infos


def _classify(
    study_dir: Path, infos: list[SeriesInfo], lookup: dict[str, str], order: tuple[str, ...]
) -> tuple[list[SeriesInfo], SeriesInfo, list[tuple[str, str]]]:
    """Channel series in ``order``, the SEG series, and (folder, reason) of ignored series."""
    by_channel: dict[str, SeriesInfo] = {}
    segs, ignored = [], []
    for info in infos:
        channel = lookup.get(info.description.strip().lower()) if info.modality == "MR" else None
        if info.is_segmentation:
            segs.append(info)
        elif channel is None:
            ignored.append((str(info.folder), f"{info.modality} {info.label} maps to no channel"))
            logger.info("ignoring series %s: %s", info.folder, ignored[-1][1])
        elif channel in by_channel:
            raise CaseRejected(
                info.folder, f"{info.label}: second series for channel {channel} ({by_channel[channel].label})"
            )
        else:
            by_channel[channel] = info
    missing = [c for c in order if c not in by_channel]
    if missing:
        raise CaseRejected(study_dir, f"missing channel(s) {missing}")
    if len(segs) != 1:
        raise CaseRejected(study_dir, f"expected one SEG series, found {len(segs)}")
    channels = [by_channel[c] for c in order]
    frames = {info.frame_of_reference_uid for info in channels}
    if len(frames) != 1:
        raise CaseRejected(study_dir, "channels have different FrameOfReferenceUIDs")
    return channels, segs[0], ignored


def _convert_channels(
    study_dir: Path, channels: list[SeriesInfo], work: Path, binary: str
) -> tuple[np.ndarray, np.ndarray]:
    """Run dcm2niix per channel; return the stacked (X, Y, Z, C) array and the shared affine."""
    arrays: list[nib.Nifti1Image] = []
    for index, info in enumerate(channels):
        # only the files check_series accepted, each in a transfer syntax dcm2niix reads
        staged = stage_series(info, work / "stage" / f"c{index}")
        try:
            img = nib.load(run_dcm2niix(staged, work / "nii", f"c{index}", binary, label=info.label))
        except Dcm2niixError as exc:
            raise CaseRejected(info.folder, str(exc)) from exc
        if img.ndim != 3:
            raise CaseRejected(info.folder, f"{info.label}: dcm2niix produced a {img.ndim}-D image")
        _check_grid(info, img)
        if arrays and (
            img.shape != arrays[0].shape
            or not np.allclose(img.affine, arrays[0].affine, rtol=0.0, atol=AFFINE_TOL)
        ):
            raise CaseRejected(study_dir, f"channel grids differ ({info.label} vs {channels[0].label})")
        arrays.append(img)
    return _stack(arrays), np.asarray(arrays[0].affine, dtype=float)


def _check_grid(info: SeriesInfo, img: nib.Nifti1Image) -> None:
    """The NIfTI voxels must be the DICOM pixels, only permuted or flipped (no resampling)."""
    geometry = info.geometry
    if geometry is None:
        raise CaseRejected(info.folder, f"{info.label}: no slice geometry")
    dicom_shape = np.array([geometry.columns, geometry.rows, geometry.n_slices])
    try:
        mapping = signed_permutation(RAS_TO_LPS @ img.affine, geometry.affine_lps())
    except ValueError as exc:
        raise CaseRejected(info.folder, f"{info.label}: dcm2niix grid differs from the DICOM grid: {exc}") from exc
    corners = mapping[:, :3] @ (np.array(img.shape) - 1) + mapping[:, 3]
    span = np.stack([mapping[:, 3], corners])
    if (
        span.min() < 0
        or (span.max(axis=0) >= dicom_shape).any()
        or np.prod(img.shape) != np.prod(dicom_shape)
    ):
        raise CaseRejected(info.folder, f"{info.label}: dcm2niix grid does not cover the DICOM slices one to one")


def _stack(images: list[nib.Nifti1Image]) -> np.ndarray:
    """Stack channels: int16 when every channel is unscaled integers within range, else float32."""
    unscaled = all(
        np.issubdtype(img.get_data_dtype(), np.integer) and img.dataobj.slope == 1 and img.dataobj.inter == 0
        for img in images
    )
    if unscaled:
        raw = np.stack([np.asarray(img.dataobj.get_unscaled()) for img in images], axis=-1)
        info = np.iinfo(np.int16)
        if raw.size == 0 or (raw.min() >= info.min and raw.max() <= info.max):
            return raw.astype(np.int16)
        return raw.astype(np.float32)
    return np.stack([img.get_fdata(dtype=np.float32) for img in images], axis=-1)


def _grade(info: SeriesInfo) -> str | None:
    """AdmittingDiagnosesDescription (0008,1080) of the study, None when absent or empty."""
    value = read_instance(info.files[0], stop_before_pixels=True).get("AdmittingDiagnosesDescription")
    if value is None:
        return None
    text = "\\".join(map(str, value)) if isinstance(value, MultiValue) else str(value)
    return text.strip() or None


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    return img


def _write_case(
    case_dir: Path,
    image: np.ndarray,
    label: np.ndarray,
    affine: np.ndarray,
    case: ConvertedCase,
    settings: str,
) -> None:
    case_dir.mkdir()
    nib.save(_nifti(image, affine), case_dir / "image.nii.gz")
    nib.save(_nifti(label.astype(np.uint8), affine), case_dir / "label.nii.gz")
    image_affine = nib.load(case_dir / "image.nii.gz").affine
    label_affine = nib.load(case_dir / "label.nii.gz").affine
    if not np.allclose(image_affine, label_affine, rtol=0.0, atol=AFFINE_TOL):
        raise RuntimeError(f"label affine differs from image affine in {case_dir}")
    meta = {
        "case_key": case.case_key,
        "channels": list(case.channels),
        "grade": case.grade,
        "content_hash": case.content_hash,
        "label_values": list(case.label_values),
        "shape": list(case.shape),
        "spacing": list(case.spacing),
        "converter": settings,
    }
    _write_json(case_dir / "case.json", meta)


def _place(staged: Path, final: Path) -> None:
    """Move a finished case folder into place, replacing an older one."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
        staged.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staged.rename(final)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)
