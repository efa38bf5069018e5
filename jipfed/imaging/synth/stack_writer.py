"""Fast writing of many DICOM files that differ in only a few elements (one series' slices).

pydicom encodes every element of every file; a 40-slice series repeats the same ~60 header
elements 40 times. :class:`StackEncoder` encodes the shared elements and the file meta
information once, in chunks between the varying tags, and per file only the varying elements
(and MediaStorageSOPInstanceUID with the meta group length). The bytes are the same as
``Dataset.save_as(path, enforce_file_format=True)`` in Explicit VR Little Endian (a test checks).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import AMBIGUOUS_VR

_PREAMBLE = b"\x00" * 128 + b"DICM"
_GROUP_LENGTH = Tag(0x0002, 0x0000)
_META_INSTANCE_UID = Tag(0x0002, 0x0003)
_SOP_INSTANCE_UID = Tag("SOPInstanceUID")
_LATIN1 = ("ISO_IR 100", "ISO_IR 6")


def _buffer() -> DicomBytesIO:
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = False, True
    return buffer


def _encode_dataset(dataset: Dataset) -> bytes:
    buffer = _buffer()
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def _encode_element(element: DataElement) -> bytes:
    if element.VR in AMBIGUOUS_VR:
        raise ValueError(f"element {element.tag} needs an explicit VR, got {element.VR}")
    buffer = _buffer()
    write_data_element(buffer, element)
    return buffer.getvalue()


class StackEncoder:
    """Encode files that share ``common`` and ``file_meta`` and differ in the ``varying`` tags.

    ``varying`` must include SOPInstanceUID (it becomes MediaStorageSOPInstanceUID);
    ``file_meta`` is the template meta information without MediaStorageSOPInstanceUID.
    """

    def __init__(self, common: Dataset, varying: Iterable[int | str], file_meta: FileMetaDataset) -> None:
        self._tags: list[BaseTag] = sorted(Tag(t) for t in varying)
        if _SOP_INSTANCE_UID not in self._tags:
            raise ValueError("varying tags must include SOPInstanceUID")
        clash = [t for t in self._tags if t in common]
        if clash:
            raise ValueError(f"varying tags must not be in the common dataset: {clash}")
        if common.get("SpecificCharacterSet", "ISO_IR 6") not in _LATIN1:
            raise ValueError(f"only Latin-1/ASCII is supported, got {common.SpecificCharacterSet!r}")
        if file_meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
            raise ValueError(
                f"only Explicit VR Little Endian is supported, got {file_meta.get('TransferSyntaxUID')}"
            )
        if file_meta.get("MediaStorageSOPClassUID") != common.get("SOPClassUID"):
            raise ValueError("file_meta MediaStorageSOPClassUID must equal the common SOPClassUID")
        bounds = [*self._tags, None]
        chunks = [Dataset() for _ in bounds]
        for element in common:
            chunks[next(i for i, b in enumerate(bounds) if b is None or element.tag < b)].add(element)
        self._chunks = [_encode_dataset(chunk) for chunk in chunks]
        meta = FileMetaDataset()
        meta.FileMetaInformationVersion = b"\x00\x01"
        for element in file_meta:
            if element.tag not in (_GROUP_LENGTH, _META_INSTANCE_UID):
                meta.add(element)
        self._meta_before = b"".join(_encode_element(e) for e in meta if e.tag < _META_INSTANCE_UID)
        self._meta_after = b"".join(_encode_element(e) for e in meta if e.tag > _META_INSTANCE_UID)

    def encode(self, varying: Dataset) -> bytes:
        """The bytes of one file: preamble, meta information, common chunks and ``varying``."""
        if sorted(varying.keys()) != self._tags:
            raise ValueError(f"varying elements must be exactly {self._tags}, got {sorted(varying.keys())}")
        uid = _encode_element(DataElement(_META_INSTANCE_UID, "UI", varying[_SOP_INSTANCE_UID].value))
        meta = self._meta_before + uid + self._meta_after
        parts = [
            _PREAMBLE,
            _encode_element(DataElement(_GROUP_LENGTH, "UL", len(meta))),
            meta,
            self._chunks[0],
        ]
        for tag, chunk in zip(self._tags, self._chunks[1:], strict=True):
            parts.append(_encode_element(varying[tag]))
            parts.append(chunk)
        return b"".join(parts)

    def write(self, path: Path, varying: Dataset) -> None:
        """Write one file (see :meth:`encode`)."""
        Path(path).write_bytes(self.encode(varying))
