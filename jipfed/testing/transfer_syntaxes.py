"""A real-world DICOM test corpus built from a synthetic case (``jipfed synth`` layout).

Each *variant* is the whole case (four MR series and the SEG) written anew under fresh UIDs (so
every variant can sit in one PACS) and changed in one way:

* a transfer syntax (:data:`SYNTAXES`): every instance re-encoded; lossless, so the converted
  voxels must equal the original's. Encoders: pydicom (deflate, big endian, implicit VR, RLE),
  pyjpegls (JPEG-LS), pylibjpeg-openjpeg (JPEG 2000, needs images of at least 32 x 32 pixels),
  python-gdcm (JPEG lossless, when installed). :func:`available_syntaxes` says which work here.
* an Enhanced (multi-frame) MR channel (:func:`multiframe_channel`);
* stray objects (an SR, a presentation state and a secondary capture in a series);
* a defect (:data:`DEFECTS`): truncated, short fragment, bad VR, damaged or cut deflate stream, a
  series split across two patients.

Layout: ``<out>/<variant>/<case_id>/<SERIES>/*.dcm`` as written by :mod:`jipfed.imaging.synth`.
"""

from __future__ import annotations

import logging
import struct
import tempfile
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from jipfed.testing.corrupt import GRAYSCALE_SOFTCOPY_PS, non_image_instance, slices_along_normal

logger = logging.getLogger(__name__)

#: Variant name → transfer syntax of every re-encoded instance.
SYNTAXES: dict[str, UID] = {
    "explicit_le": ExplicitVRLittleEndian,
    "implicit_le": ImplicitVRLittleEndian,
    "big_endian": ExplicitVRBigEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg_ls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
    "jpeg_lossless": JPEGLosslessSV1,
}
_SYNTH_UID_ROOT = "2.25."
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:jipfed:transfer-syntax-corpus")


class EncoderMissing(RuntimeError):
    """No installed encoder writes this transfer syntax for this instance."""


@dataclass(frozen=True)
class Variant:
    """One corpus entry: its case folder and what the pipeline must do with it.

    ``defect`` is None for a variant that must convert voxel-identical; else the words its skip
    reason must contain. ``channel`` names the series the defect is in (None: the whole case).
    """

    name: str
    case_dir: Path
    defect: str | None = None
    channel: str | None = None


# -- encoding -------------------------------------------------------------------------------------
def encode(ds: Dataset, syntax: UID) -> Dataset:
    """``ds`` (Explicit VR Little Endian, as synth writes it) re-encoded in ``syntax``: changed in
    place, except for JPEG lossless (a new data set, from gdcm); use the returned one."""
    if syntax == JPEGLosslessSV1:
        return _gdcm_encode(ds, syntax)
    if syntax.is_compressed:
        try:
            ds.compress(syntax, generate_instance_uid=False)
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            raise EncoderMissing(f"{syntax.name}: {exc}") from exc
        return ds
    if syntax == ExplicitVRBigEndian and int(ds.get("BitsAllocated", 8)) > 8 and "PixelData" in ds:
        array = ds.pixel_array
        ds.PixelData = array.astype(array.dtype.newbyteorder(">")).tobytes()
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def write_encoded(ds: Dataset, path: Path) -> None:
    """Write ``ds`` in its file meta transfer syntax (big endian included)."""
    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    if syntax == ExplicitVRBigEndian:
        ds.preamble = b"\0" * 128
        pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False, force_encoding=True)
        return
    ds.save_as(path, enforce_file_format=True)


def _gdcm_encode(ds: Dataset, syntax: UID) -> Dataset:
    """JPEG lossless SV1 via python-gdcm (pydicom has no JPEG encoder)."""
    try:
        import gdcm  # type: ignore[import-not-found]
    except ImportError as exc:
        raise EncoderMissing(f"{syntax.name}: python-gdcm is not installed") from exc
    if int(ds.get("BitsAllocated", 0)) % 8:
        raise EncoderMissing(f"{syntax.name}: gdcm aborts the process on BitsAllocated {ds.BitsAllocated}")
    with tempfile.TemporaryDirectory(prefix="jipfed-gdcm-") as tmp:
        source, target = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        ds.save_as(source, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(source))
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(target))
        if not reader.Read():
            raise EncoderMissing(f"{syntax.name}: gdcm cannot read the instance")
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise EncoderMissing(f"{syntax.name}: gdcm could not encode")
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise EncoderMissing(f"{syntax.name}: gdcm could not write")
        return pydicom.dcmread(target)


def available_syntaxes(sample: Path) -> tuple[dict[str, UID], dict[str, str]]:
    """(variants whose syntax can be written here, variant → why not) tried on one sample file."""
    usable: dict[str, UID] = {}
    missing: dict[str, str] = {}
    for name, syntax in SYNTAXES.items():
        try:
            encode(pydicom.dcmread(sample), syntax)
        except EncoderMissing as exc:
            missing[name] = str(exc)
        else:
            usable[name] = syntax
    return usable, missing


# -- whole cases -----------------------------------------------------------------------------------
def remap_uids(ds: Dataset, variant: str) -> None:
    """Replace every synthetic UID (``2.25.`` root) by one derived from it and ``variant``, in place,
    sequences and file meta included, so references between instances stay consistent."""

    def new(uid: str) -> str:
        if not uid.startswith(_SYNTH_UID_ROOT):
            return uid
        return f"2.25.{uuid.uuid5(_UID_NAMESPACE, f'{variant}/{uid}').int}"

    for dataset in (ds, ds.file_meta):
        for element in dataset.iterall():
            if element.VR == "UI" and element.value:
                values = element.value if element.VM > 1 else [element.value]
                mapped = [new(str(v)) for v in values]
                element.value = mapped if element.VM > 1 else mapped[0]


def reencode_case(case_dir: Path, out_root: Path, variant: str, syntax: UID) -> Path:
    """Write the whole case under ``out_root/variant/<case_id>`` with new UIDs, every instance in
    ``syntax`` (a SEG no encoder can compress stays in Explicit VR Little Endian); return it."""
    target = Path(out_root) / variant / Path(case_dir).name
    for path in sorted(Path(case_dir).rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        remap_uids(ds, variant)
        try:
            ds = encode(ds, syntax)
        except EncoderMissing:
            if str(ds.Modality) != "SEG":
                raise
            logger.info("%s: SEG kept in Explicit VR Little Endian (no %s encoder)", variant, syntax.name)
        out = target / path.relative_to(case_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_encoded(ds, out)
    return target


def multiframe_channel(case_dir: Path, channel: str, *, enhanced: bool = True) -> Path:
    """Replace a channel's slices by one Legacy Converted Enhanced MR instance (highdicom), relabelled
    as Enhanced MR Image Storage when ``enhanced``; same series UID and number. Return the folder."""
    folder = Path(case_dir) / channel
    slices = [pydicom.dcmread(path) for path in slices_along_normal(folder)]
    first = slices[0]
    with warnings.catch_warnings():
        # PatientName is the single-component pseudonym SYN-<site>-<NNN> on purpose.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        image = hd.legacy.LegacyConvertedEnhancedMRImage(
            slices,
            series_instance_uid=str(first.SeriesInstanceUID),
            series_number=int(first.SeriesNumber),
            sop_instance_uid=_derived_uid(str(first.SeriesInstanceUID), "multiframe"),
            instance_number=1,
        )
    if enhanced:
        image.SOPClassUID = EnhancedMRImageStorage
        image.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    image.SeriesDescription = first.SeriesDescription
    for path in folder.iterdir():
        path.unlink()
    image.save_as(folder / "0001.dcm", enforce_file_format=True)
    return folder


def _derived_uid(uid: str, part: str) -> str:
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, f'{uid}/{part}').int}"


# -- defects --------------------------------------------------------------------------------------
def _middle_slice(case_dir: Path, channel: str) -> Path:
    slices = slices_along_normal(Path(case_dir) / channel)
    return slices[len(slices) // 2]


def truncate(case_dir: Path, channel: str) -> Path:
    """Cut the middle slice of ``channel`` in the middle of its pixel data (a little endian file)."""
    path = _middle_slice(case_dir, channel)
    data = path.read_bytes()
    at = data.rfind(struct.pack("<HH", 0x7FE0, 0x0010))
    if at < 0:
        raise ValueError(f"{path}: no little endian PixelData element to cut")
    path.write_bytes(data[: at + (len(data) - at) // 2])
    return path


def short_fragment(case_dir: Path, channel: str) -> Path:
    """Halve the first pixel data fragment of the middle slice (an encapsulated syntax), keeping
    the file itself well formed."""
    path = _middle_slice(case_dir, channel)
    ds = pydicom.dcmread(path)
    fragments = list(generate_fragments(ds.PixelData))
    half = len(fragments[0]) // 2
    fragments[0] = fragments[0][: half - half % 2]
    ds.PixelData = encapsulate([b"".join(fragments)])
    ds.save_as(path, enforce_file_format=True)
    return path


def bad_vr(case_dir: Path, channel: str) -> Path:
    """Overwrite the VR of SliceThickness (0018,0050) with an invalid one in the middle slice of an
    Explicit VR Little Endian ``channel``."""
    path = _middle_slice(case_dir, channel)
    data = bytearray(path.read_bytes())
    tag = struct.pack("<HH", 0x0018, 0x0050) + b"DS"
    at = data.find(tag)
    if at < 0:
        raise ValueError(f"{path}: no explicit VR SliceThickness element to damage")
    data[at + 4 : at + 6] = b"\x01\x02"
    path.write_bytes(bytes(data))
    return path


def damaged_deflate(case_dir: Path, channel: str) -> Path:
    """Overwrite 64 bytes in the middle of the deflated data set of the middle slice."""
    path = _middle_slice(case_dir, channel)
    data = bytearray(path.read_bytes())
    middle = len(data) * 2 // 3
    data[middle : middle + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    return path


def cut_deflate(case_dir: Path, channel: str) -> Path:
    """Cut the deflated middle slice to 2/3 of its size: inflating it fails (``zlib.error``)."""
    path = _middle_slice(case_dir, channel)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def stray_objects(case_dir: Path, channel: str) -> Path:
    """Add a Basic Text SR, a presentation state and a secondary capture to ``channel``."""
    folder = Path(case_dir) / channel
    ds = pydicom.dcmread(slices_along_normal(folder)[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _derived_uid(str(ds.SOPInstanceUID), "sc")
    ds.Modality = "OT"
    ds.save_as(folder / "zz_capture.dcm", enforce_file_format=True)
    non_image_instance(folder.parent, series_dir=folder)
    non_image_instance(folder.parent, series_dir=folder, sop_class_uid=GRAYSCALE_SOFTCOPY_PS)
    return folder


def split_patients(case_dir: Path, channel: str) -> Path:
    """Give every second slice of ``channel`` another PatientID (one series, two patients)."""
    folder = Path(case_dir) / channel
    for path in slices_along_normal(folder)[1::2]:
        ds = pydicom.dcmread(path)
        ds.PatientID = f"{ds.PatientID}-OTHER"
        ds.save_as(path, enforce_file_format=True)
    return folder


#: Defect → (function, syntax variants it applies to, words the skip reason must contain).
DEFECTS: dict[str, tuple[Callable[[Path, str], Path], tuple[str, ...], str]] = {
    "truncated": (truncate, ("explicit_le", "rle", "jpeg2000"), "truncated"),
    "short_fragment": (short_fragment, ("rle", "jpeg_ls", "jpeg2000"), "damaged"),
    "bad_vr": (bad_vr, ("explicit_le",), "damaged or truncated file"),
    "damaged_deflate": (damaged_deflate, ("deflated",), "damaged or truncated file"),
    "cut_deflate": (cut_deflate, ("deflated",), "unreadable (error: Error -5 while decompressing"),
    "split_patients": (split_patients, ("explicit_le",), "split across 2 patients"),
}


def build_corpus(case_dir: Path, out_root: Path, *, channel: str = "FLAIR") -> list[Variant]:
    """Every variant of one synthetic case under ``out_root`` (see the module docstring).

    Syntaxes without an encoder here are left out (see :func:`available_syntaxes`).
    """
    case_dir, out_root = Path(case_dir), Path(out_root)
    usable, missing = available_syntaxes(next((case_dir / channel).iterdir()))
    for name, why in missing.items():
        logger.warning("corpus: no %s variant: %s", name, why)
    variants = [Variant(name, reencode_case(case_dir, out_root, name, syntax)) for name, syntax in usable.items()]
    for name, enhanced in (("enhanced_mr", True), ("legacy_enhanced_mr", False)):
        folder = reencode_case(case_dir, out_root, name, ExplicitVRLittleEndian)
        multiframe_channel(folder, "T2", enhanced=enhanced)
        variants.append(Variant(name, folder))
    stray = reencode_case(case_dir, out_root, "stray_objects", ExplicitVRLittleEndian)
    stray_objects(stray, channel)
    variants.append(Variant("stray_objects", stray, channel=channel))
    for defect, (damage, syntaxes, reason) in DEFECTS.items():
        for syntax_name in syntaxes:
            if syntax_name not in usable:
                continue
            name = f"{defect}-{syntax_name}"
            folder = reencode_case(case_dir, out_root, name, usable[syntax_name])
            damage(folder, channel)
            variants.append(Variant(name, folder, defect=reason, channel=channel))
    return variants

