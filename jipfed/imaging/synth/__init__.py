"""Synthetic BraTS-like multi-site data set written as real DICOM (``jipfed synth``).

Per case: four MR series (FLAIR, T1, T1c, T2) on one geometry and a DICOM SEG (labels 1 core,
2 oedema, 3 enhancing), plus ground truth that never goes to the PACS. Sites differ as set by
:class:`SiteProfile`; everything is deterministic per seed. See :mod:`.dataset` for the layout.
"""

from jipfed.imaging.synth.case import DEFAULT_SHAPE, SyntheticCase, generate_case
from jipfed.imaging.synth.contrast import CHANNELS
from jipfed.imaging.synth.dataset import (
    DEFAULT_STUDY_DESCRIPTION,
    CaseEntry,
    DatasetManifest,
    SiteEntry,
    write_case,
    write_dataset,
)
from jipfed.imaging.synth.geometry import SliceGeometry
from jipfed.imaging.synth.profiles import ORIENTATIONS, SiteProfile, default_site_profiles

__all__ = [
    "CHANNELS",
    "DEFAULT_SHAPE",
    "DEFAULT_STUDY_DESCRIPTION",
    "ORIENTATIONS",
    "CaseEntry",
    "DatasetManifest",
    "SiteEntry",
    "SiteProfile",
    "SliceGeometry",
    "SyntheticCase",
    "default_site_profiles",
    "generate_case",
    "write_case",
    "write_dataset",
]
