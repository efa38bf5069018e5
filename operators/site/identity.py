"""Who this site is: read from an Airflow Variable at run time, never from the DAG file.

The Variable ``jipfed_site`` holds JSON::

    {"site_id": "site-a",                          # must match the site token's site
     "data_root": "/data/jipfed",                  # persistent caches: dicom/, nifti/, preprocessed/
     "pacs_conn_id": "jipfed_pacs_default",        # optional, these are the defaults
     "central_conn_id": "jipfed_central_default",
     "fetch_transport": "dicomweb",                # or "cget" (DIMSE C-GET)
     "default_dataset": "BRATS-SYNTH",             # cohort when the experiment names none
     "workflow_dir": "/data/jipfed/workflows",     # run folders <workflow_dir>/<run_id>/
     "preprocess": {"spacing_mm": [2, 2, 2], "spatial_size": [64, 64, 48]},
     "device": null}                               # torch device for training; null = cuda if any

One Airflow may host several identities (a demo or test on one machine): the environment
variable ``JIPFED_HOSTED_SITES="site-a,site-b"``, read when the DAG file is parsed, makes one
DAG pair per identity, each reading the Variable ``jipfed_site__<site id>``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jipfed.operators.compat import AirflowFailException, Variable

from jipfed.storage.layout import validate_slug

if TYPE_CHECKING:  # imaging imports MONAI and torch: only at run time, never when the DAG is parsed
    from jipfed.imaging.preprocess import PreprocessConfig

IDENTITY_VARIABLE = "jipfed_site"
HOSTED_SITES_ENV = "JIPFED_HOSTED_SITES"
#: Folders below ``data_root`` that hold the caches (a run folder must never be one of them).
CACHE_DIRS = ("dicom", "nifti", "preprocessed", "reports")
PREPROCESS_KEYS = ("spacing_mm", "spatial_size")


@dataclass(frozen=True)
class SiteIdentity:
    """One site's configuration (see the module docstring for the Variable's JSON).

    ``default_dataset`` None is ``BRATS-SYNTH``, ``workflow_dir`` None is ``<data_root>/workflows``
    and ``preprocess`` None the default ``PreprocessConfig``: after validation none of them is None.
    """

    site_id: str
    data_root: Path
    pacs_conn_id: str = "jipfed_pacs_default"
    central_conn_id: str = "jipfed_central_default"
    fetch_transport: str = "dicomweb"
    default_dataset: str | None = None
    workflow_dir: Path | None = None
    preprocess: PreprocessConfig | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        from jipfed.cohort.qido import DEFAULT_DATASET
        from jipfed.imaging.pipeline import TRANSPORTS
        from jipfed.imaging.preprocess import PreprocessConfig

        validate_slug(self.site_id, "site id")
        where = f"site {self.site_id!r}"
        data_root = Path(self.data_root)
        if not data_root.is_absolute():
            raise ValueError(f"{where}: data_root must be an absolute path, got {str(data_root)!r}")
        workflow_dir = Path(self.workflow_dir) if self.workflow_dir is not None else data_root / "workflows"
        if not workflow_dir.is_absolute():
            raise ValueError(f"{where}: workflow_dir must be an absolute path, got {str(workflow_dir)!r}")
        caches = [data_root / name for name in CACHE_DIRS]
        if workflow_dir in (data_root, *data_root.parents, *caches):
            raise ValueError(
                f"{where}: workflow_dir {str(workflow_dir)!r} would put run folders over the caches in "
                f"{str(data_root)!r}; use a folder of its own (default <data_root>/workflows)"
            )
        if self.default_dataset is None:
            object.__setattr__(self, "default_dataset", DEFAULT_DATASET)
        for name in ("pacs_conn_id", "central_conn_id", "default_dataset"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: {name} must be a non-empty string, got {value!r}")
        if self.fetch_transport not in TRANSPORTS:
            raise ValueError(
                f"{where}: fetch_transport must be one of {TRANSPORTS}, got {self.fetch_transport!r}"
            )
        if self.preprocess is None:
            object.__setattr__(self, "preprocess", PreprocessConfig())
        elif not isinstance(self.preprocess, PreprocessConfig):
            raise ValueError(f"{where}: preprocess must be a PreprocessConfig")
        if self.device is not None and (not isinstance(self.device, str) or not self.device):
            raise ValueError(f"{where}: device must be a torch device name or null, got {self.device!r}")
        object.__setattr__(self, "data_root", data_root)
        object.__setattr__(self, "workflow_dir", workflow_dir)

    def run_dir(self, run_id: str) -> Path:
        """The run folder ``<workflow_dir>/<run_id>/`` (Kaapana's ``WORKFLOW_DIR/<run_id>``)."""
        if not isinstance(run_id, str) or run_id in ("", ".", "..") or "/" in run_id or "\\" in run_id:
            raise ValueError(f"site {self.site_id!r}: run id {run_id!r} cannot name a run folder")
        return Path(str(self.workflow_dir)) / run_id

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SiteIdentity:
        """Build from the Variable's JSON object; unknown keys are an error (typos must not pass)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        names = {name for name in cls.__dataclass_fields__}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; known: {sorted(names)}")
        missing = sorted({"site_id", "data_root"} - set(data))
        if missing:
            raise ValueError(f"missing key(s) {missing}")
        values = dict(data)
        preprocess = values.pop("preprocess", None)
        if preprocess is not None:
            from jipfed.imaging.preprocess import PreprocessConfig

            if not isinstance(preprocess, Mapping) or set(preprocess) - set(PREPROCESS_KEYS):
                raise ValueError(
                    f"preprocess must be an object with keys from {PREPROCESS_KEYS}, got {preprocess!r}"
                )
            values["preprocess"] = PreprocessConfig(
                **{key: tuple(value) for key, value in preprocess.items()}
            )
        return cls(**values)


def identity_variable(site_id: str | None = None) -> str:
    """The Variable holding an identity: ``jipfed_site``, or ``jipfed_site__<id>`` for a hosted one."""
    return (
        IDENTITY_VARIABLE if site_id is None else f"{IDENTITY_VARIABLE}__{validate_slug(site_id, 'site id')}"
    )


def parse_identity(variable: str, raw: str | Mapping[str, Any] | None) -> SiteIdentity:
    """The identity from the Variable's value; ValueError naming the Variable when it is missing or invalid."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise ValueError(
            f"Airflow Variable {variable!r} is not set: it must hold this site's identity as JSON, "
            '{"site_id": "...", "data_root": "/..."} (see jipfed.operators.site.identity)'
        )
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
        return SiteIdentity.from_dict(data)
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"Airflow Variable {variable!r} does not hold a valid site identity: {exc}") from exc


def load_identity(variable: str, expected_site: str | None = None) -> SiteIdentity:
    """Read and validate the identity in ``variable`` (at run time); fail the task when it is unusable.

    Args:
        variable: the Variable's key.
        expected_site: the hosted site id the DAG was made for; the identity must name it.

    Raises:
        AirflowFailException: the Variable is missing or invalid, or names another site.
    """
    try:
        identity = parse_identity(
            variable, Variable.get(variable, None)
        )  # positional: 2.x and 3.x names differ
    except ValueError as exc:
        raise AirflowFailException(str(exc)) from exc
    if expected_site is not None and identity.site_id != expected_site:
        raise AirflowFailException(
            f"Airflow Variable {variable!r} names site {identity.site_id!r}, but this DAG is for "
            f"site {expected_site!r}"
        )
    return identity


def hosted_sites(environ: Mapping[str, str] | None = None) -> list[str | None]:
    """Site ids listed in ``JIPFED_HOSTED_SITES`` (comma separated), or ``[None]`` for a single site.

    Read when the DAG file is parsed (it decides which DAGs exist). Raises ValueError for an
    invalid or repeated id.
    """
    text = (os.environ if environ is None else environ).get(HOSTED_SITES_ENV, "")
    ids = [part.strip() for part in text.split(",") if part.strip()]
    for site_id in ids:
        validate_slug(site_id, f"site id in {HOSTED_SITES_ENV}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{HOSTED_SITES_ENV} lists a site more than once: {text!r}")
    return list(ids) or [None]
