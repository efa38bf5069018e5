"""Helpers for real-world DICOM: error summaries, file and series names in reasons, normalisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    RLELossless,
)

from jipfed.imaging.dicom_io import (
    InstanceUnreadable,
    file_label,
    read_instance,
    series_label,
    short_error,
    to_explicit_little_endian,
)
from jipfed.testing.dicom_samples import write_sample_case
from jipfed.testing.transfer_syntaxes import encode, write_encoded


def test_short_error_lists_what_a_colon_introduces_and_stays_short() -> None:
    exc = RuntimeError("Unable to decode as exceptions were raised by all available plugins:\n  a: bad\n  b: worse")
    assert short_error(exc) == "RuntimeError: a: bad; b: worse"
    long = short_error(ValueError("word " * 100))
    assert long.startswith("ValueError: word") and long.endswith(" ...") and len(long) < 180


def test_file_label_hides_uid_file_names() -> None:
    ds = Dataset()
    ds.InstanceNumber = 7
    assert file_label(Path("0007.dcm"), ds) == "instance 7 (0007.dcm)"
    assert file_label(Path("1.2.826.0.1.3680043.2.1125.1.dcm"), ds) == "instance 7"
    assert file_label(Path("1.2.826.0.1.3680043.2.1125.1.dcm")) == "a file named by its UID"


def test_series_label_uses_number_and_description_only() -> None:
    ds = Dataset()
    ds.PatientID, ds.SeriesNumber, ds.SeriesDescription = "SECRET-42", 3, "T1 AX"
    assert series_label(ds) == 'series 3 "T1 AX"'
    assert series_label(Dataset()) == "series without number (no description)"


@pytest.mark.parametrize("syntax", [ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, RLELossless])
def test_normalised_copy_has_the_same_pixels(tmp_path: Path, syntax: str) -> None:
    (flair, *_rest) = write_sample_case(tmp_path / "in", shape=(16, 16, 2))
    original = read_instance(flair.files[0])
    path = tmp_path / "encoded.dcm"
    write_encoded(encode(read_instance(flair.files[0]), syntax), path)
    encoded = read_instance(path)
    assert encoded.file_meta.TransferSyntaxUID == syntax
    plain = to_explicit_little_endian(encoded)
    plain.save_as(tmp_path / "plain.dcm", enforce_file_format=True)
    back = read_instance(tmp_path / "plain.dcm")
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.SOPInstanceUID == original.SOPInstanceUID
    np.testing.assert_array_equal(back.pixel_array, original.pixel_array)


def test_garbage_and_empty_files_are_unreadable(tmp_path: Path) -> None:
    garbage, empty = tmp_path / "garbage.dcm", tmp_path / "empty.dcm"
    garbage.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 64)
    empty.write_bytes(b"")
    for path in (garbage, empty):
        with pytest.raises(InstanceUnreadable) as info:
            read_instance(path)
        assert info.value.path == path and info.value.reason
