"""Operators of the site DAG: cohort, fetch, convert, preprocess, model, train, upload, clean-up."""

from jipfed.operators.site.base import BATCH_NAME, SiteOperator
from jipfed.operators.site.cleanup import CleanupRunFolderOperator
from jipfed.operators.site.data import (
    ConvertOperator,
    FetchDicomOperator,
    PreprocessOperator,
    SelectCohortOperator,
)
from jipfed.operators.site.failure import report_failure_to_central
from jipfed.operators.site.identity import SiteIdentity, hosted_sites, identity_variable, load_identity
from jipfed.operators.site.model import GetGlobalModelOperator, TrainLocalOperator, UploadUpdateOperator
from jipfed.operators.site.work import GetWorkOperator

__all__ = [
    "BATCH_NAME",
    "CleanupRunFolderOperator",
    "ConvertOperator",
    "FetchDicomOperator",
    "GetGlobalModelOperator",
    "GetWorkOperator",
    "PreprocessOperator",
    "SelectCohortOperator",
    "SiteIdentity",
    "SiteOperator",
    "TrainLocalOperator",
    "UploadUpdateOperator",
    "hosted_sites",
    "identity_variable",
    "load_identity",
    "report_failure_to_central",
]
