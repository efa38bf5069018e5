"""Who a site is: its identity (ids, folders, connections, settings), validated without heavy imports.

The Airflow Variable ``jipfed_site`` holds it as JSON (``jipfed.operators.site.identity`` reads it);
in a pod, ``jipfed task`` reads the same JSON from ``JIPFED_SITE`` (``jipfed.tasks.env``)::

    {"site_id": "site-a",                          # must match the site token's site
     "data_root": "/data/jipfed",                  # persistent caches: dicom/, nifti/, preprocessed/
     "pacs_conn_id": "jipfed_pacs_default",        # optional, these are the defaults
     "central_conn_id": "jipfed_central_default",
     "fetch_transport": "dicomweb",                # or "cget" (DIMSE C-GET)
     "default_dataset": "BRATS-SYNTH",             # cohort when the experiment names none
     "workflow_dir": "/data/jipfed/workflows",     # run folders <workflow_dir>/<run_id>/
     "preprocess": {"spacing_mm": [2, 2, 2], "spatial_size": [64, 64, 48]},
     "device": null,                               # torch device for training; null = cuda if any
     "execution": {"mode": "in_process"}}          # or pods: see jipfed.tasks.execution

Validation imports neither torch nor the DICOM stack, so a scheduler or an Airflow worker that only
launches pods can read it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from jipfed.imaging.preprocess import PreprocessConfig
from jipfed.storage.layout import validate_slug
from jipfed.tasks.execution import ExecutionConfig

#: Folders below ``data_root`` that hold the caches (a run folder must never be one of them).
CACHE_DIRS = ("dicom", "nifti", "preprocessed", "reports")
PREPROCESS_KEYS = ("spacing_mm", "spatial_size")
#: ``jipfed.imaging.pipeline.TRANSPORTS`` and ``jipfed.cohort.qido.DEFAULT_DATASET``, repeated here
#: because those modules import pydicom (tests/deploy/test_tasks.py checks that they agree).
FETCH_TRANSPORTS = ("dicomweb", "cget")
DEFAULT_DATASET = "BRATS-SYNTH"


@dataclass(frozen=True)
class SiteIdentity:
    """One site's configuration (see the module docstring for the JSON).

    ``default_dataset`` None is ``BRATS-SYNTH``, ``workflow_dir`` None is ``<data_root>/workflows``,
    ``preprocess`` None the default ``PreprocessConfig`` and ``execution`` None in-process: after
    validation none of them is None.
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
    execution: ExecutionConfig | None = None

    def __post_init__(self) -> None:
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
        if self.fetch_transport not in FETCH_TRANSPORTS:
            raise ValueError(
                f"{where}: fetch_transport must be one of {FETCH_TRANSPORTS}, got {self.fetch_transport!r}"
            )
        if self.preprocess is None:
            object.__setattr__(self, "preprocess", PreprocessConfig())
        elif not isinstance(self.preprocess, PreprocessConfig):
            raise ValueError(f"{where}: preprocess must be a PreprocessConfig")
        if self.device is not None and (not isinstance(self.device, str) or not self.device):
            raise ValueError(f"{where}: device must be a torch device name or null, got {self.device!r}")
        if self.execution is None:
            object.__setattr__(self, "execution", ExecutionConfig())
        elif not isinstance(self.execution, ExecutionConfig):
            raise ValueError(f"{where}: execution must be an ExecutionConfig")
        object.__setattr__(self, "data_root", data_root)
        object.__setattr__(self, "workflow_dir", workflow_dir)

    def run_dir(self, run_id: str) -> Path:
        """The run folder ``<workflow_dir>/<run_id>/`` (Kaapana's ``WORKFLOW_DIR/<run_id>``)."""
        if not isinstance(run_id, str) or run_id in ("", ".", "..") or "/" in run_id or "\\" in run_id:
            raise ValueError(f"site {self.site_id!r}: run id {run_id!r} cannot name a run folder")
        return Path(str(self.workflow_dir)) / run_id

    def to_dict(self) -> dict[str, Any]:
        """The JSON object :meth:`from_dict` reads (``execution`` left out: it is the launcher's)."""
        preprocess = self.preprocess or PreprocessConfig()
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "execution"}
        data["data_root"] = str(self.data_root)
        data["workflow_dir"] = str(self.workflow_dir)
        data["preprocess"] = {key: list(getattr(preprocess, key)) for key in PREPROCESS_KEYS}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SiteIdentity:
        """Build from the JSON object; unknown keys are an error (typos must not pass)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; known: {sorted(names)}")
        missing = sorted({"site_id", "data_root"} - set(data))
        if missing:
            raise ValueError(f"missing key(s) {missing}")
        values = dict(data)
        preprocess = values.pop("preprocess", None)
        if preprocess is not None:
            if not isinstance(preprocess, Mapping) or set(preprocess) - set(PREPROCESS_KEYS):
                raise ValueError(
                    f"preprocess must be an object with keys from {PREPROCESS_KEYS}, got {preprocess!r}"
                )
            values["preprocess"] = PreprocessConfig(
                **{key: tuple(value) for key, value in preprocess.items()}
            )
        execution = values.pop("execution", None)
        if execution is not None:
            values["execution"] = ExecutionConfig.from_dict(execution)
        return cls(**values)


def parse_identity(source: str, raw: str | Mapping[str, Any] | None) -> SiteIdentity:
    """The identity from JSON text or an object; ValueError naming ``source`` when missing or invalid.

    Args:
        source: where the JSON came from, for messages (``Airflow Variable 'jipfed_site'``).
        raw: the JSON text or the decoded object.
    """
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise ValueError(
            f"{source} is not set: it must hold this site's identity as JSON, "
            '{"site_id": "...", "data_root": "/..."} (see jipfed.tasks.identity)'
        )
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
        return SiteIdentity.from_dict(data)
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{source} does not hold a valid site identity: {exc}") from exc
