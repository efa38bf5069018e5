"""The tumour label map of a case as a DICOM SEG (highdicom, BINARY), one segment per label.

Segment numbers equal label values (BraTS 2023): 1 necrotic / non-enhancing tumour core,
2 peritumoral oedema, 3 enhancing tumour. All three segments are always described; frames that
are empty are omitted (highdicom's default), so an LGG case without enhancement has no frame for
segment 3. Frame ``k`` of the label array is derived from source image ``k``: the source images
must be in the label array's slice order (sorted along the slice normal), else the SEG is flipped.
BINARY, not LABELMAP: Orthanc 1.10 stores a LABELMAP SEG but cannot serve it over C-GET.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from jipfed.imaging.synth.case import SyntheticCase
from jipfed.imaging.synth.mr_series import SOFTWARE_VERSION, StudyUids, instance_uid
from jipfed.imaging.synth.phantom import LABEL_CORE, LABEL_EDEMA, LABEL_ENHANCING

SERIES_DESCRIPTION = "Tumor segmentation"
SERIES_NUMBER = 100
#: Segment number (= label value) -> (SegmentLabel, SNOMED segmented property type).
SEGMENTS = {
    LABEL_CORE: ("Necrotic and non-enhancing tumor core", codes.SCT.Neoplasm),
    LABEL_EDEMA: ("Peritumoral edema", codes.SCT.Edema),
    LABEL_ENHANCING: ("Enhancing tumor", codes.SCT.Neoplasm),
}
_CREATED_AFTER_STUDY = timedelta(days=1)


def segment_descriptions() -> list[hd.seg.SegmentDescription]:
    """The three BraTS segments, manual annotation, category Morphologically Abnormal Structure."""
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            anatomic_regions=[codes.SCT.Brain],
        )
        for number, (label, property_type) in SEGMENTS.items()
    ]


def build_segmentation(
    case: SyntheticCase, source_images: Sequence[Dataset], uids: StudyUids
) -> hd.seg.Segmentation:
    """A BINARY SEG of ``case.label`` derived from ``source_images`` (slice ``k`` = image ``k``)."""
    if len(source_images) != case.geometry.n_slices:
        raise ValueError(
            f"need one source image per slice ({case.geometry.n_slices}), got {len(source_images)}"
        )
    normal = case.geometry.normal
    along = [float(np.asarray(ds.ImagePositionPatient, float) @ normal) for ds in source_images]
    if any(b <= a for a, b in zip(along, along[1:], strict=False)):
        raise ValueError("source images must be sorted by position along the slice normal")
    created = case.study_datetime + _CREATED_AFTER_STUDY
    seg = hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=case.label,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(),
        series_instance_uid=uids.series["SEG"],
        series_number=SERIES_NUMBER,
        sop_instance_uid=instance_uid(case, "SEG", 0),
        instance_number=1,
        manufacturer="JIP Federated",
        manufacturer_model_name="jipfed synth",
        software_versions=SOFTWARE_VERSION,
        device_serial_number="0",
        series_description=SERIES_DESCRIPTION,
        content_description="Synthetic ground truth",
        content_label="TUMOR",
        content_creator_name="SYNTHETIC^ANNOTATOR",
        content_date=created.date(),
        content_time=created.time(),
        series_date=created.date(),
        series_time=created.time(),
    )
    _fix_clock_fields(seg, case)
    return seg


def _fix_clock_fields(seg: Dataset, case: SyntheticCase) -> None:
    """Replace what highdicom derives from the clock or a random UID by values of the case."""
    created = case.study_datetime + _CREATED_AFTER_STUDY
    seg.InstanceCreationDate = created.strftime("%Y%m%d")
    seg.InstanceCreationTime = created.strftime("%H%M%S")
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = created.strftime("%Y%m%d%H%M%S")
    dimension_uid = instance_uid(case, "SEG", "dimension-organization")
    for item in seg.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = dimension_uid
    for item in seg.get("DimensionIndexSequence", []):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = dimension_uid
