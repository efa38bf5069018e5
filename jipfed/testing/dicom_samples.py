"""DICOM test data for PACS tests.

:func:`write_sample_dataset`: tiny, valid studies (MR slice series from pydicom, a BINARY SEG from
highdicom), layout ``<out>/<case_id>/<SERIES>/<NNNN>.dcm`` with SERIES = FLAIR, T1, SEG. Every value
is derived from ``seed`` so the same call writes the same files.

:func:`synth_dataset`: a small ``jipfed synth`` data set (one site), written once per process and
shared read-only by the tests that ask for the same arguments.
"""

from __future__ import annotations

import atexit
import functools
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

log = logging.getLogger(__name__)

MR_SERIES = ("FLAIR", "T1")


@dataclass(frozen=True)
class SampleSeries:
    """One written series: its UIDs, modality, description and files (sorted)."""

    study_uid: str
    series_uid: str
    modality: str
    description: str
    files: tuple[Path, ...]


def _uid(seed: int, *parts: object) -> str:
    return generate_uid(entropy_srcs=[str(seed), *map(str, parts)])


def mr_slice(
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    frame_of_reference_uid: str,
    index: int,
    pixels: np.ndarray,
    description: str,
    series_number: int,
    study_description: str,
    patient_id: str,
) -> Dataset:
    """One axial MR slice (1 mm pixels, 2 mm slices, uint16, explicit VR little endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.Modality = "MR"
    ds.PatientID = patient_id
    ds.PatientName = f"{patient_id}^"
    ds.PatientSex = "O"
    ds.PatientBirthDate = ""
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = description
    ds.SeriesNumber = series_number
    ds.InstanceNumber = index + 1
    ds.Manufacturer = "jipfed"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.PositionReferenceIndicator = ""
    ds.SliceThickness = "2"
    ds.SpacingBetweenSlices = "2"
    ds.PixelSpacing = ["1", "1"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.ImagePositionPatient = ["0", "0", f"{2 * index}"]
    ds.SliceLocation = f"{2 * index}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds


def write_sample_case(
    out_dir: str | Path,
    *,
    case_index: int = 0,
    study_description: str = "BRATS-SYNTH",
    shape: tuple[int, int, int] = (16, 16, 4),
    seed: int = 0,
) -> list[SampleSeries]:
    """Write one case (FLAIR, T1 and a SEG on FLAIR) under ``out_dir/case-NNN``; returns its series."""
    rows, cols, n_slices = shape
    if min(shape) < 1:
        raise ValueError(f"shape must be positive, got {shape!r}")
    rng = np.random.default_rng([seed, case_index])
    case_dir = Path(out_dir) / f"case-{case_index:03d}"
    study_uid = _uid(seed, case_index, "study")
    frame_uid = _uid(seed, case_index, "frame")
    patient_id = f"SAMPLE-{case_index:03d}"
    written: list[SampleSeries] = []
    flair: list[Dataset] = []
    for number, description in enumerate(MR_SERIES, start=1):
        series_uid = _uid(seed, case_index, description)
        folder = case_dir / description
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for index in range(n_slices):
            ds = mr_slice(
                study_uid=study_uid,
                series_uid=series_uid,
                sop_uid=_uid(seed, case_index, description, index),
                frame_of_reference_uid=frame_uid,
                index=index,
                pixels=rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16),
                description=description,
                series_number=number,
                study_description=study_description,
                patient_id=patient_id,
            )
            path = folder / f"{index:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
            if description == "FLAIR":
                flair.append(ds)
        written.append(SampleSeries(study_uid, series_uid, "MR", description, tuple(files)))
    written.append(_write_seg(case_dir / "SEG", flair, seed=seed, case_index=case_index))
    log.debug("wrote sample case %s", case_dir)
    return written


def _write_seg(folder: Path, source: list[Dataset], *, seed: int, case_index: int) -> SampleSeries:
    rows, cols = source[0].Rows, source[0].Columns
    mask = np.zeros((len(source), rows, cols), dtype=np.uint8)
    mask[:, rows // 4 : rows // 2, cols // 4 : cols // 2] = 1
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="tumour",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    series_uid = _uid(seed, case_index, "SEG")
    seg = hd.seg.Segmentation(
        source_images=source,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=series_uid,
        series_number=100,
        sop_instance_uid=_uid(seed, case_index, "SEG", 0),
        instance_number=1,
        manufacturer="jipfed",
        manufacturer_model_name="dicom_samples",
        software_versions="1",
        device_serial_number="0",
        series_description="Tumor segmentation",
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "0000.dcm"
    seg.save_as(path, enforce_file_format=True)
    return SampleSeries(source[0].StudyInstanceUID, series_uid, "SEG", "Tumor segmentation", (path,))


def write_sample_dataset(
    out_dir: str | Path,
    *,
    n_cases: int = 2,
    study_description: str = "BRATS-SYNTH",
    shape: tuple[int, int, int] = (16, 16, 4),
    seed: int = 0,
) -> list[SampleSeries]:
    """Write ``n_cases`` cases under ``out_dir``; returns every series written."""
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases!r}")
    series: list[SampleSeries] = []
    for case_index in range(n_cases):
        series += write_sample_case(
            out_dir, case_index=case_index, study_description=study_description, shape=shape, seed=seed
        )
    return series


def instance_signature(path: str | Path) -> tuple[str, bytes]:
    """``(SOPInstanceUID, PixelData bytes)`` of one file: what a byte-for-byte fetch must preserve."""
    ds = pydicom.dcmread(path)
    return str(ds.SOPInstanceUID), bytes(ds.PixelData)


def series_in_folder(folder: str | Path) -> list[SampleSeries]:
    """Every DICOM series below ``folder`` (any layout, e.g. ``jipfed synth`` output), sorted by
    study UID, then path."""
    found: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in sorted(Path(folder).rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    series = [
        SampleSeries(
            study_uid=str(items[0][1].StudyInstanceUID),
            series_uid=series_uid,
            modality=str(items[0][1].Modality),
            description=str(items[0][1].get("SeriesDescription", "")),
            files=tuple(path for path, _ in items),
        )
        for series_uid, items in found.items()
    ]
    return sorted(series, key=lambda s: (s.study_uid, s.files[0]))


@functools.cache
def synth_dataset(
    study_description: str = "BRATS-SYNTH",
    n_cases: int = 2,
    shape: tuple[int, int, int] = (32, 32, 16),
    seed: int = 0,
) -> tuple[SampleSeries, ...]:
    """The series of a one-site ``jipfed synth`` data set, written once per process into a temp
    folder (removed at exit). Callers must not modify the files."""
    from jipfed.imaging.synth import default_site_profiles, write_dataset

    out = Path(tempfile.mkdtemp(prefix="jipfed-synth-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    profiles = default_site_profiles(1, n_cases, heterogeneous=False)
    write_dataset(out, profiles, shape=shape, seed=seed, study_description=study_description, progress=False)
    return tuple(series_in_folder(out))
