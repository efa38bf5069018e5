"""A series folder as dcm2niix can read it: only the accepted image files, in a syntax it knows.

dcm2niix reads a whole folder, so stray objects left out by the series check must not be in it,
and it rejects some transfer syntaxes (deflated: "Unsupported transfer syntax"; big endian is
not trusted). :func:`stage_series` links each accepted file into a fresh folder when dcm2niix
reads its syntax (:data:`~jipfed.imaging.dicom_io.DCM2NIIX_SYNTAXES`) and writes an inflated,
byte-swapped or decoded Explicit VR Little Endian copy otherwise.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from jipfed.imaging.dicom_io import DCM2NIIX_SYNTAXES, read_instance, write_explicit_little_endian
from jipfed.imaging.series_check import SeriesInfo

logger = logging.getLogger(__name__)


def stage_series(info: SeriesInfo, dest: Path) -> Path:
    """Fill the new folder ``dest`` with the series' image files, normalised where needed."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    syntaxes = info.transfer_syntaxes or ("",) * len(info.files)
    normalised = 0
    for path, syntax in zip(info.files, syntaxes, strict=True):
        target = dest / path.name
        if syntax in DCM2NIIX_SYNTAXES:
            _link(path, target)
        else:
            write_explicit_little_endian(read_instance(path), target)
            normalised += 1
    if normalised:
        logger.info("%s: %d file(s) rewritten as Explicit VR Little Endian for dcm2niix", info.label, normalised)
    return dest


def _link(source: Path, target: Path) -> None:
    """Hard link (same file system, no copy), else copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
