"""The environment contract of ``jipfed task <step>`` (a pod, or any shell): names, reading, writing.

Kaapana's contract (every Kaapana pod gets these)::

    WORKFLOW_DIR       the run folder as the pod sees it (/kaapana/mounted/data/<run_id>)
    OPERATOR_IN_DIR    folder name below WORKFLOW_DIR this step reads (the upstream task's out dir)
    OPERATOR_OUT_DIR   folder name below WORKFLOW_DIR this step writes
    BATCH_NAME         per-series folder (batch)      RUN_ID, DAG_ID, TASK_ID   for messages
    $WORKFLOW_DIR/conf/conf.json                      the run's conf (read when present)

JIP Federated's (``JIPFED_*``; the three secrets come from Kubernetes Secrets by reference)::

    JIPFED_SITE            site identity JSON (jipfed.tasks.identity), paths as the pod sees them
    JIPFED_WORK            the work item JSON (WorkItem.to_dict()) of the run's step
    JIPFED_MODEL_IN_DIR    train: folder name below WORKFLOW_DIR holding the global model
    JIPFED_EVALUATE        train: "1" (default) scores the trained model on held-out cases, "0" not
    JIPFED_PACS_CONN       the PACS Connection's fields as JSON, no password
    JIPFED_PACS_PASSWORD   (secret) its password
    JIPFED_CENTRAL_CONN    the central endpoint's Connection as JSON, no password
    JIPFED_CENTRAL_TOKEN   (secret) the site token
    JIPFED_STORE_CONN      central: the model store's Connection as JSON, no secret key
    JIPFED_STORE_SECRET_KEY  (secret) its secret access key
    JIPFED_EXPERIMENT, JIPFED_STEP   aggregate: the experiment and plan step (else from conf.json)
    JIPFED_DISPATCH_NEXT   aggregate: "1" (default) opens the next step for pulling sites

The step's return value (the operator's XCom value) is written as JSON to
``$WORKFLOW_DIR/$OPERATOR_OUT_DIR/task-result.json`` and printed as the last line of stdout.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jipfed.tasks.connections import EnvConnection
from jipfed.tasks.execution import SECRET_ENV
from jipfed.tasks.identity import SiteIdentity, parse_identity
from jipfed.tasks.run import SiteRun, make_run

WORKFLOW_DIR = "WORKFLOW_DIR"
OPERATOR_IN_DIR = "OPERATOR_IN_DIR"
OPERATOR_OUT_DIR = "OPERATOR_OUT_DIR"
BATCH_NAME = "BATCH_NAME"
RUN_ID, DAG_ID, TASK_ID = "RUN_ID", "DAG_ID", "TASK_ID"
SITE = "JIPFED_SITE"
WORK = "JIPFED_WORK"
MODEL_IN_DIR = "JIPFED_MODEL_IN_DIR"
EVALUATE = "JIPFED_EVALUATE"
EXPERIMENT = "JIPFED_EXPERIMENT"
STEP = "JIPFED_STEP"
DISPATCH_NEXT = "JIPFED_DISPATCH_NEXT"
#: connection name -> (variable with the Connection's public JSON, variable with its secret)
CONNECTIONS = {
    "pacs": ("JIPFED_PACS_CONN", SECRET_ENV["pacs_password"]),
    "central": ("JIPFED_CENTRAL_CONN", SECRET_ENV["central_token"]),
    "store": ("JIPFED_STORE_CONN", SECRET_ENV["store_secret_key"]),
}
#: connection name -> the ``execution.secrets`` entry naming its Kubernetes Secret
CONNECTION_SECRET = {"pacs": "pacs_password", "central": "central_token", "store": "store_secret_key"}
RESULT_FILE = "task-result.json"
CONF_FILE = Path("conf") / "conf.json"


def required(environ: Mapping[str, str], name: str) -> str:
    """The variable's value; ValueError naming it when missing or empty."""
    value = environ.get(name, "").strip()
    if not value:
        raise ValueError(f"environment variable {name} is not set (see docs/pod-contract.md)")
    return value


def flag(environ: Mapping[str, str], name: str, default: bool = True) -> bool:
    """A "1"/"0" (or true/false) variable; ValueError for anything else."""
    text = environ.get(name, "").strip().lower()
    if not text:
        return default
    if text not in ("1", "0", "true", "false"):
        raise ValueError(f"environment variable {name} must be 1 or 0, got {text!r}")
    return text in ("1", "true")


def run_conf(environ: Mapping[str, str]) -> dict[str, Any]:
    """``$WORKFLOW_DIR/conf/conf.json`` ({} when absent); ValueError when it is not a JSON object."""
    path = Path(required(environ, WORKFLOW_DIR)) / CONF_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def site_identity(environ: Mapping[str, str]) -> SiteIdentity:
    return parse_identity(f"environment variable {SITE}", environ.get(SITE))


def site_run(environ: Mapping[str, str], *, needs_work: bool = True) -> SiteRun:
    """The run the variables describe: identity, WORKFLOW_DIR, in / out dirs, work item."""
    identity = site_identity(environ)
    work_data = None
    if needs_work:
        try:
            work_data = json.loads(required(environ, WORK))
        except ValueError as exc:
            raise ValueError(f"environment variable {WORK}: {exc}") from exc
        if not isinstance(work_data, dict):
            raise ValueError(f"environment variable {WORK} must hold a JSON object (the work item)")
    in_dir = environ.get(OPERATOR_IN_DIR, "").strip() or None
    for name, value in ((OPERATOR_IN_DIR, in_dir), (OPERATOR_OUT_DIR, environ.get(OPERATOR_OUT_DIR, "x"))):
        if value is not None and ("/" in value or value in (".", "..")):
            raise ValueError(f"environment variable {name} must be a folder name, got {value!r}")
    return make_run(
        identity,
        Path(required(environ, WORKFLOW_DIR)),
        operator_in_dir=in_dir,
        operator_out_dir=required(environ, OPERATOR_OUT_DIR),
        work_data=work_data,
    )


def connection(environ: Mapping[str, str], name: str) -> EnvConnection:
    """The connection ``name`` (pacs, central, store) from its JSON and secret variables."""
    conn_var, secret_var = CONNECTIONS[name]
    return EnvConnection.from_json(
        required(environ, conn_var), environ.get(secret_var) or None, f"environment variable {conn_var}"
    )


def result_path(environ: Mapping[str, str]) -> Path:
    return Path(required(environ, WORKFLOW_DIR)) / required(environ, OPERATOR_OUT_DIR) / RESULT_FILE


def kaapana_env(
    *, workflow_dir: str, run_id: str, dag_id: str, task_id: str, in_dir: str | None, out_dir: str
) -> dict[str, str]:
    """Kaapana's variables for a pod whose run folder is ``workflow_dir`` (as the pod sees it)."""
    env = {
        WORKFLOW_DIR: workflow_dir,
        BATCH_NAME: "batch",
        OPERATOR_OUT_DIR: out_dir,
        RUN_ID: run_id,
        DAG_ID: dag_id,
        TASK_ID: task_id,
    }
    if in_dir:
        env[OPERATOR_IN_DIR] = in_dir
    return env
