"""MR Image Storage datasets (one single-frame instance per slice) for a synthetic case.

Slice ``k`` of a series is InstanceNumber ``k + 1`` at ``geometry.slice_positions()[k]``; all
series of a case share one study, one FrameOfReferenceUID and one geometry. UIDs, dates and
times are derived from the case, never from the clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage
from pydicom.valuerep import format_number_as_ds

from jipfed.imaging.synth.case import SyntheticCase
from jipfed.imaging.synth.contrast import CHANNELS
from jipfed.imaging.synth.stack_writer import StackEncoder
from jipfed.imaging.synth.uids import synth_uid

SOFTWARE_VERSION = "jipfed-synth 1"
IMPLEMENTATION_VERSION_NAME = "JIPFED_SYNTH_1"
_GYROMAGNETIC_MHZ_PER_T = 42.577478


@dataclass(frozen=True)
class SequenceParameters:
    """Acquisition parameters of one MR series (written to the headers, not simulated)."""

    series_number: int
    minutes_after_start: int
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    repetition_time_ms: float
    echo_time_ms: float
    echo_train_length: int
    flip_angle_deg: float
    inversion_time_ms: float | None = None
    contrast_agent: str | None = None


#: Per channel, in the order the series were "acquired" (T1 first, post-contrast T1 last).
SEQUENCES: dict[str, SequenceParameters] = {
    "T1": SequenceParameters(2, 2, ("SE",), ("SP",), 550.0, 10.0, 1, 90.0),
    "T2": SequenceParameters(3, 6, ("SE",), ("SK", "SP"), 4200.0, 95.0, 14, 90.0),
    "FLAIR": SequenceParameters(4, 11, ("SE", "IR"), ("SK", "SP", "MP"), 9000.0, 120.0, 16, 150.0, 2500.0),
    "T1c": SequenceParameters(5, 19, ("SE",), ("SP",), 550.0, 10.0, 1, 90.0, contrast_agent="GADOBUTROL"),
}


@dataclass(frozen=True)
class StudyUids:
    """The UIDs of one case's study, as derived from (seed, site, case)."""

    study: str
    frame_of_reference: str
    series: dict[str, str]  # series name (FLAIR, T1, T1c, T2, SEG) -> SeriesInstanceUID


def study_uids(case: SyntheticCase) -> StudyUids:
    """Study, frame-of-reference and series UIDs of ``case``."""
    key = (case.seed, case.site_id, case.case_index)
    return StudyUids(
        study=synth_uid(*key, "study"),
        frame_of_reference=synth_uid(*key, "frame-of-reference"),
        series={name: synth_uid(*key, "series", name) for name in (*CHANNELS, "SEG")},
    )


def instance_uid(case: SyntheticCase, series_name: str, index: int | str) -> str:
    """SOPInstanceUID of instance ``index`` (zero-based) of ``series_name`` (or another named UID)."""
    return synth_uid(case.seed, case.site_id, case.case_index, "instance", series_name, index)


def _ds_list(values: Sequence[float]) -> list[str]:
    return [format_number_as_ds(float(v)) for v in values]


def _window(image: np.ndarray) -> tuple[str, str]:
    """WindowCenter / WindowWidth spanning the 1st to 99.5th percentile of nonzero pixels."""
    head = image[image > 0]
    if head.size == 0:
        return "0", "1"
    low, high = np.percentile(head, [1.0, 99.5])
    return format_number_as_ds(round((low + high) / 2, 1)), format_number_as_ds(
        round(max(high - low, 1.0), 1)
    )


def study_level(case: SyntheticCase, uids: StudyUids, study_description: str) -> Dataset:
    """Patient, study and equipment attributes shared by every instance of the case (SEG too)."""
    profile = case.profile
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = case.study_datetime.strftime("%Y%m%d")
    ds.StudyTime = case.study_datetime.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.AdmittingDiagnosesDescription = case.grade
    ds.PatientName = case.case_id
    ds.PatientID = case.case_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = uids.study
    ds.StudyID = "1"
    ds.InstitutionName = f"Synthetic {profile.site_id}"
    return ds


VARYING_TAGS = ("SOPInstanceUID", "InstanceNumber", "ImagePositionPatient", "SliceLocation", "PixelData")


def series_header(case: SyntheticCase, channel: str, uids: StudyUids, study_description: str) -> Dataset:
    """Everything but :data:`VARYING_TAGS` of one MR series (``channel`` in FLAIR, T1, T1c, T2)."""
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {CHANNELS}, got {channel!r}")
    profile, geometry = case.profile, case.geometry
    params = SEQUENCES[channel]
    pixels = case.images[CHANNELS.index(channel)]
    acquired = case.study_datetime + timedelta(minutes=params.minutes_after_start)

    common = study_level(case, uids, study_description)
    common.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    common.SOPClassUID = MRImageStorage
    _set_series_times(common, acquired)
    common.Modality = "MR"
    common.Manufacturer = profile.manufacturer
    common.ManufacturerModelName = profile.model_name
    common.SoftwareVersions = SOFTWARE_VERSION
    common.StationName = profile.site_id.upper()
    common.SeriesDescription = channel
    common.ProtocolName = "BRAIN TUMOUR"
    common.BodyPartExamined = "HEAD"
    common.ScanningSequence = list(params.scanning_sequence)
    common.SequenceVariant = list(params.sequence_variant)
    common.ScanOptions = ""
    common.MRAcquisitionType = "2D"
    common.SliceThickness = format_number_as_ds(geometry.slice_thickness)
    common.RepetitionTime = format_number_as_ds(params.repetition_time_ms)
    common.EchoTime = format_number_as_ds(params.echo_time_ms)
    if params.inversion_time_ms is not None:
        common.InversionTime = format_number_as_ds(params.inversion_time_ms)
    common.NumberOfAverages = "1"
    common.ImagingFrequency = format_number_as_ds(
        round(_GYROMAGNETIC_MHZ_PER_T * profile.field_strength_t, 6)
    )
    common.ImagedNucleus = "1H"
    common.MagneticFieldStrength = format_number_as_ds(profile.field_strength_t)
    common.SpacingBetweenSlices = format_number_as_ds(geometry.slice_spacing)
    common.EchoTrainLength = params.echo_train_length
    common.FlipAngle = format_number_as_ds(params.flip_angle_deg)
    common.PatientPosition = "HFS"
    if params.contrast_agent is not None:
        common.ContrastBolusAgent = params.contrast_agent
    common.SeriesInstanceUID = uids.series[channel]
    common.SeriesNumber = params.series_number
    common.AcquisitionNumber = 1
    common.ImageOrientationPatient = _ds_list(geometry.image_orientation())
    common.FrameOfReferenceUID = uids.frame_of_reference
    common.PositionReferenceIndicator = ""
    common.SamplesPerPixel = 1
    common.PhotometricInterpretation = "MONOCHROME2"
    common.Rows = geometry.rows
    common.Columns = geometry.cols
    common.PixelSpacing = _ds_list(geometry.pixel_spacing)
    common.BitsAllocated = 16
    common.BitsStored = 16
    common.HighBit = 15
    common.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    common.WindowCenter, common.WindowWidth = _window(pixels)
    return common


def slice_elements(case: SyntheticCase, channel: str) -> list[Dataset]:
    """Per slice (slice 0 first): the :data:`VARYING_TAGS` elements."""
    geometry = case.geometry
    pixels = case.images[CHANNELS.index(channel)]
    little_endian = pixels.dtype.newbyteorder("<")
    positions = geometry.slice_positions()
    normal = geometry.normal
    out = []
    for k in range(geometry.n_slices):
        ds = Dataset()
        ds.add(DataElement(0x00080018, "UI", instance_uid(case, channel, k)))  # SOPInstanceUID
        ds.add(DataElement(0x00200013, "IS", k + 1))  # InstanceNumber
        ds.add(DataElement(0x00200032, "DS", _ds_list(positions[k])))  # ImagePositionPatient
        slice_location = format_number_as_ds(round(float(positions[k] @ normal), 6))
        ds.add(DataElement(0x00201041, "DS", slice_location))  # SliceLocation
        pixel_bytes = np.ascontiguousarray(pixels[k], dtype=little_endian).tobytes()
        ds.add(DataElement(0x7FE00010, "OW", pixel_bytes))  # PixelData
        out.append(ds)
    return out


def build_mr_series(
    case: SyntheticCase, channel: str, uids: StudyUids, study_description: str
) -> list[Dataset]:
    """The complete instances (with ``file_meta``) of one MR series, slice 0 first."""
    header = series_header(case, channel, uids, study_description)
    instances = []
    for varying in slice_elements(case, channel):
        ds = Dataset()
        ds.update(header)
        ds.update(varying)
        ds.file_meta = file_meta_template()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        instances.append(ds)
    return instances


def write_mr_series(
    case: SyntheticCase, channel: str, uids: StudyUids, study_description: str, folder: Path
) -> list[Path]:
    """Write one MR series as ``<folder>/<InstanceNumber:04d>.dcm``; return the paths."""
    header = series_header(case, channel, uids, study_description)
    encoder = StackEncoder(header, VARYING_TAGS, file_meta_template())
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for varying in slice_elements(case, channel):
        path = folder / f"{int(varying.InstanceNumber):04d}.dcm"
        encoder.write(path, varying)
        paths.append(path)
    return paths


def _set_series_times(ds: Dataset, acquired: datetime) -> None:
    ds.InstanceCreationDate = acquired.strftime("%Y%m%d")
    ds.InstanceCreationTime = acquired.strftime("%H%M%S")
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = acquired.strftime("%Y%m%d")
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = acquired.strftime("%H%M%S")


def file_meta_template() -> FileMetaDataset:
    """File meta information of an MR slice, without MediaStorageSOPInstanceUID."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta
