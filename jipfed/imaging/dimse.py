"""DIMSE access to a PACS: fetch one series with C-GET (pynetdicom).

C-GET returns the instances over the same association, so the SCU must offer a storage context
(with the SCP role) for every SOP class it will receive, and handle C-STORE (field-notes.md:
without the Segmentation Storage context Orthanc fails the SEG with 0xC000). Image classes are
offered in every common transfer syntax, one context each, so instances arrive as stored (a PACS
may be unable to transcode, e.g. JPEG 2000); stray objects (SR, presentation states, RT,
secondary captures) are accepted too and left out later by the series check.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    BasicTextSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    EncapsulatedPDFStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    RTDoseStorage,
    RTPlanStorage,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    StudyRootQueryRetrieveInformationModelGet,
)
from pynetdicom.status import Status

from jipfed.cohort.model import SeriesRef, check_uid
from jipfed.imaging.pacs import PacsConfig, PacsError

log = logging.getLogger(__name__)

#: Image storage classes a series may hold; each is offered once per transfer syntax below, so the
#: PACS sends every instance as stored (no transcoding, which it may not be able to do).
IMAGE_STORAGE_SOP_CLASSES = (
    MRImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    SegmentationStorage,
)
#: Transfer syntaxes offered for image storage (one presentation context each).
IMAGE_TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLELossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)
#: Stray objects an image series may hold (received, then left out by the series check): offered
#: with the uncompressed syntaxes in one context each, so C-GET does not fail on them.
OTHER_STORAGE_SOP_CLASSES = (
    BasicTextSRStorage,
    EnhancedSRStorage,
    ComprehensiveSRStorage,
    KeyObjectSelectionDocumentStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
    RTStructureSetStorage,
    RTPlanStorage,
    RTDoseStorage,
    EncapsulatedPDFStorage,
)
#: Every storage SOP class offered for C-GET (each needs the SCP role).
STORAGE_SOP_CLASSES = IMAGE_STORAGE_SOP_CLASSES + OTHER_STORAGE_SOP_CLASSES
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)
_PENDING = (Status.PENDING, 0xFF01)
_FAILURE_OUT_OF_RESOURCES = 0xA702


def fetch_series_cget(config: PacsConfig, ref: SeriesRef, dest_dir: str | Path) -> int:
    """C-GET every instance of ``ref`` into ``dest_dir`` as ``<SOPInstanceUID>.dcm``; returns the count.

    Raises ValueError if the config has no DIMSE port, PacsError if the association is rejected or
    aborted, times out, or the C-GET ends with a status other than success.
    """
    if config.dimse_port is None:
        raise ValueError("PacsConfig.dimse_port is None: this PACS has no DIMSE service configured")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    where = f"PACS {config.called_aet}@{config.dimse_host}:{config.dimse_port}"
    received: list[str] = []
    store_errors: list[str] = []

    def on_store(event: Event) -> int:
        try:
            uid = check_uid(str(event.request.AffectedSOPInstanceUID), "SOPInstanceUID")
            with (dest / f"{uid}.dcm").open("wb") as handle:
                handle.write(event.encoded_dataset())
        except (OSError, ValueError) as exc:
            store_errors.append(str(exc))
            return _FAILURE_OUT_OF_RESOURCES
        received.append(uid)
        return int(Status.SUCCESS)

    ae = AE(ae_title=config.calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = config.timeout_s
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in IMAGE_STORAGE_SOP_CLASSES:
        for syntax in IMAGE_TRANSFER_SYNTAXES:
            ae.add_requested_context(sop_class, [syntax])
    for sop_class in OTHER_STORAGE_SOP_CLASSES:
        ae.add_requested_context(sop_class, list(_UNCOMPRESSED))
    roles = [build_role(sop_class, scp_role=True) for sop_class in STORAGE_SOP_CLASSES]

    assoc = ae.associate(
        config.dimse_host,
        config.dimse_port,
        ae_title=config.called_aet,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    if not assoc.is_established:
        state = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise PacsError(
            f"{where}: association as {config.calling_aet} {state} (is the PACS up and our AE known?)"
        )
    status: Dataset | None = None
    try:
        for status, _identifier in assoc.send_c_get(
            _series_query(ref), StudyRootQueryRetrieveInformationModelGet
        ):
            if not status or status.Status not in _PENDING:
                break
        lost = assoc.is_aborted or not assoc.is_established
    finally:
        if assoc.is_established:
            assoc.release()
    if not status or lost:
        raise PacsError(
            f"{where}: C-GET of series {ref.series_uid} got no final status; the association was "
            f"{'aborted or closed' if lost else 'kept'} (calling AE {config.calling_aet!r} unknown to the PACS, "
            f"PACS stopped, or no answer within {config.timeout_s} s)"
        )
    if store_errors:
        raise PacsError(f"{where}: could not write received instances: {store_errors[0]}")
    if status.Status != Status.SUCCESS:
        raise PacsError(
            f"{where}: C-GET of series {ref.series_uid} ended with status 0x{status.Status:04X} "
            f"({status.get('NumberOfFailedSuboperations', '?')} failed, "
            f"{status.get('NumberOfCompletedSuboperations', '?')} completed; a failed instance is of a SOP "
            "class or transfer syntax we do not accept, or the PACS could not read it: see the PACS log)"
        )
    log.debug("C-GET %s: %d instances of series %s", where, len(received), ref.series_uid)
    return len(set(received))


def _series_query(ref: SeriesRef) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = ref.study_uid
    query.SeriesInstanceUID = ref.series_uid
    return query
