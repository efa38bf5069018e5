"""Reading DICOM files as a hospital PACS holds them: any transfer syntax, possibly damaged.

* :func:`read_instance` reads one file and turns *every* parse or decode error (``zlib.error`` of a
  damaged deflated file, a bad VR, a truncated header, ...) into :class:`InstanceUnreadable`.
* :func:`pixel_defect` decodes every frame with pydicom's pixel handlers (pylibjpeg, pyjpegls,
  openjpeg, RLE plugins) and says what is wrong, or None: compressed data is verified, not trusted.
* :func:`to_explicit_little_endian` turns any readable instance into Explicit VR Little Endian,
  uncompressed (inflated, byte-swapped, decoded), for tools that cannot read its syntax.
* :func:`series_label` names a series the way a site admin finds it (number and description),
  never by patient identifiers or UIDs.
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pixel_array
from pydicom.uid import UID, ExplicitVRLittleEndian

logger = logging.getLogger(__name__)

#: Transfer syntaxes dcm2niix reads (checked with dcm2niix v1.0.20260724); others are normalised.
DCM2NIIX_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2",  # Implicit VR Little Endian
        "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
    }
)
_MESSAGE_CHARS = 160
_UID_FILE_NAME = re.compile(r"[0-9]+(\.[0-9]+)+(\.dcm)?")
#: Attributes every instance must have; missing ones mean a damaged or truncated file.
REQUIRED = ("SOPClassUID", "SOPInstanceUID")


def file_label(path: Path, ds: Dataset | None = None) -> str:
    """How a reason names a file: ``instance 5 (0005.dcm)``; a file name that is a UID (the fetch
    cache's ``<SOPInstanceUID>.dcm``) is left out, the log has the full path."""
    path = Path(path)
    name = None if _UID_FILE_NAME.fullmatch(path.name) else path.name
    number = ds.get("InstanceNumber") if ds is not None else None
    if number not in (None, ""):
        return f"instance {number}" + (f" ({name})" if name else "")
    return name or "a file named by its UID"


class InstanceUnreadable(Exception):
    """A file that cannot be read as a DICOM instance; ``reason`` names the defect."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{file_label(path)}: {reason}")
        self.path = Path(path)
        self.reason = reason


def short_error(exc: BaseException) -> str:
    """``Type: message`` on one line, at most 160 characters (cut at a word); a message that only
    introduces a list (pydicom: "... all available plugins:") is followed by the list."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.endswith(":") and len(lines) > 1:
        text = "; ".join(lines[1:])
    if len(text) > _MESSAGE_CHARS:
        text = text[:_MESSAGE_CHARS].rsplit(" ", 1)[0] + " ..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_instance(
    path: Path, *, stop_before_pixels: bool = False, required: tuple[str, ...] = REQUIRED
) -> Dataset:
    """Read one DICOM file; raise :class:`InstanceUnreadable` for any parse error, a file that ends
    inside an element (pydicom only warns), or a data set without the ``required`` attributes
    (pydicom stops silently where a damaged element, e.g. a bad VR, derails the parser)."""
    path = Path(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
            # values are parsed lazily: touch them now so a bad value fails here, not later
            for element in ds.iterall():
                _ = element.value
    except Exception as exc:  # noqa: BLE001 - any parser error is a property of the file
        logger.debug("cannot read %s", path, exc_info=True)
        raise InstanceUnreadable(path, f"unreadable ({short_error(exc)})") from exc
    notes = [str(w.message).split(" in file ")[0] for w in caught]
    if any(note.startswith("End of file reached") for note in notes):
        raise InstanceUnreadable(path, "truncated file (it ends inside an element)")
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", FileMetaDataset()):
        raise InstanceUnreadable(path, "no transfer syntax in the file meta information (not a DICOM file?)")
    missing = [keyword for keyword in required if keyword not in ds]
    if missing:
        hint = f"; parser: {notes[0][:_MESSAGE_CHARS]}" if notes else ""
        raise InstanceUnreadable(
            path, f"damaged or truncated file, the data set lacks {', '.join(missing)}{hint}"
        )
    return ds


def transfer_syntax(ds: Dataset) -> UID:
    """The instance's transfer syntax UID."""
    return UID(str(ds.file_meta.TransferSyntaxUID))


def syntax_name(ds: Dataset) -> str:
    """Human name of the instance's transfer syntax, e.g. "RLE Lossless"."""
    uid = transfer_syntax(ds)
    return uid.name if uid.name != uid else f"transfer syntax {uid}"


def pixel_defect(ds: Dataset) -> str | None:
    """Why the pixel data cannot be used, or None: missing, too short, or a frame fails to decode.

    Every frame is decoded (compressed data included); a decoder error is a defect, a decoder
    warning (a quirk it resolved, e.g. BitsStored differing from the codestream) is only logged.
    """
    if "PixelData" not in ds:
        return "no pixel data (truncated file?)"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    syntax = transfer_syntax(ds)
    if not syntax.is_encapsulated:
        expected = (
            int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * int(ds.BitsAllocated) * frames + 7
        ) // 8
        if len(ds.PixelData) < expected:
            return f"truncated pixel data ({len(ds.PixelData)} of {expected} bytes)"
    expected_shape = (int(ds.Rows), int(ds.Columns))
    for index in range(frames):  # one frame at a time: nothing cached, little memory
        where = f"frame {index + 1} of {frames}: " if frames > 1 else ""
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                array = pixel_array(ds, index=index if frames > 1 else None)
            for warning in caught:  # e.g. header/codestream mismatches the decoder resolved
                logger.info("decoding %s: %s", ds.get("SOPInstanceUID", "?"), warning.message)
        except Exception as exc:  # noqa: BLE001 - any decoder failure means damaged pixel data
            logger.debug("pixel decode failed", exc_info=True)
            return f"damaged {syntax_name(ds)} pixel data ({where}{short_error(exc)})"
        if array.shape[:2] != expected_shape:
            return f"{where}decoded pixel data has shape {array.shape}, expected {expected_shape}"
    return None


def to_explicit_little_endian(ds: Dataset) -> Dataset:
    """A copy of ``ds`` in Explicit VR Little Endian with native (uncompressed) pixel data."""
    out = copy.deepcopy(ds)
    syntax = transfer_syntax(ds)
    if "PixelData" in out and syntax.is_compressed:
        out.decompress(generate_instance_uid=False)
    elif "PixelData" in out and not syntax.is_little_endian and int(ds.BitsAllocated) > 8:
        array = np.asarray(ds.pixel_array)  # native byte order; 1- and 8-bit data need no swap
        out.PixelData = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    plain = Dataset()
    for element in out:  # a fresh data set, so pydicom encodes it anew in the target syntax
        plain.add(element)
    plain.file_meta = copy.deepcopy(ds.file_meta)
    plain.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return plain


def write_explicit_little_endian(ds: Dataset, path: Path) -> None:
    """Write ``ds`` (see :func:`to_explicit_little_endian`) as a DICOM file."""
    to_explicit_little_endian(ds).save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)


def functional_group(groups: Dataset, shared: Dataset, keyword: str) -> Dataset | None:
    """First item of a functional group macro, per-frame taking precedence over shared; or None."""
    for source in (groups, shared):
        if keyword in source and len(source[keyword].value):
            return source[keyword].value[0]
    return None


def series_label(ds: Dataset) -> str:
    """``series 3 "T1 AX"``: SeriesNumber and SeriesDescription, no identifiers."""
    number = ds.get("SeriesNumber")
    description = str(ds.get("SeriesDescription", "") or "").strip()
    text = f"series {number}" if number not in (None, "") else "series without number"
    return f'{text} "{description}"' if description else f"{text} (no description)"
