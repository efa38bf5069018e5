"""What every site operator shares: the site identity, the work item, Kaapana-style run folders.

Folder convention (as Kaapana's operators, so ours chain with theirs)::

    <workflow_dir>/<run_id>/                      the run folder (WORKFLOW_DIR/<run_id>), deleted at the end
    <workflow_dir>/<run_id>/<operator_out_dir>/   batch-level output of one operator (default: its task id)
    <workflow_dir>/<run_id>/batch/<series>/<operator_out_dir>/   per-series output (BATCH_NAME)

An operator reads from ``operator_in_dir`` (by default the ``operator_out_dir`` of its
``input_operator``) and returns the path of its main output as its XCom value. The work item
(the step to answer) is the XCom value of ``work_task_id``. The caches (DICOM, NIfTI,
preprocessed) live in the identity's ``data_root``, outside the run folder, and outlive it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jipfed.operators.compat import AirflowFailException, BaseOperator, Context
from jipfed.operators.site.identity import IDENTITY_VARIABLE, SiteIdentity, load_identity

if TYPE_CHECKING:  # the core modules import torch: only at run time, never when the DAG is parsed
    from jipfed.federation.dispatch import WorkItem

#: Kaapana's name of the folder holding one sub-folder per series of a run.
BATCH_NAME = "batch"
WORK_TASK_ID = "get_work"


@dataclass(frozen=True)
class SiteRun:
    """One task's view of its run: who the site is, what it works on, and its folders."""

    identity: SiteIdentity
    run_dir: Path
    in_dir: Path | None
    out_dir: Path
    work: WorkItem | None

    @property
    def where(self) -> str:
        """``site ..., experiment ..., round ..., step ...`` for messages."""
        text = f"site {self.identity.site_id!r}"
        if self.work is not None:
            ticket = self.work.ticket
            text += f", experiment {ticket.experiment!r}, round {ticket.round}, step {ticket.step}"
        return text

    def require_work(self) -> WorkItem:
        if self.work is None:
            raise AirflowFailException(f"{self.where}: this task needs a work item and has none")
        return self.work


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as JSON, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_json(path: Path, what: str) -> Any:
    """Read a JSON file an upstream task wrote; fail the task clearly when it is missing."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise AirflowFailException(f"{what} not found at {path}: did the upstream task run?") from None


def work_from_xcom(context: Context, work_task_id: str) -> WorkItem | None:
    """The work item the task ``work_task_id`` returned in this run (None if it returned none)."""
    from jipfed.federation.dispatch import WorkItem

    data = context["ti"].xcom_pull(task_ids=work_task_id)
    return None if data is None else WorkItem.from_dict(data)


def make_site_run(
    context: Context,
    *,
    site_variable: str,
    hosted_site: str | None,
    work_task_id: str | None,
    operator_in_dir: str | None,
    operator_out_dir: str,
) -> SiteRun:
    """Read the identity (and the work item, if ``work_task_id``) and create the task's out dir."""
    identity = load_identity(site_variable, hosted_site)
    try:
        run_dir = identity.run_dir(context["run_id"])
    except ValueError as exc:
        raise AirflowFailException(str(exc)) from exc
    out_dir = run_dir / operator_out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    work = work_from_xcom(context, work_task_id) if work_task_id else None
    in_dir = run_dir / operator_in_dir if operator_in_dir else None
    run = SiteRun(identity=identity, run_dir=run_dir, in_dir=in_dir, out_dir=out_dir, work=work)
    if work_task_id and work is None:
        raise AirflowFailException(f"{run.where}: task {work_task_id!r} returned no work item")
    return run


class SiteOperator(BaseOperator):
    """Base of the site DAG's operators (identity, work item, run folders).

    Args:
        site_variable: the Airflow Variable holding the site identity (read at run time).
        hosted_site: the site id this DAG was made for when one Airflow hosts several; the
            identity must name it. None: any.
        work_task_id: the task whose return value is the work item; None for a task that needs none.
        input_operator: upstream operator whose ``operator_out_dir`` is this one's ``operator_in_dir``.
        operator_in_dir: folder name below the run folder to read from (overrides ``input_operator``).
        operator_out_dir: folder name below the run folder to write to; default the task id.
    """

    ui_color = "#d9ecf2"

    def __init__(
        self,
        *,
        site_variable: str = IDENTITY_VARIABLE,
        hosted_site: str | None = None,
        work_task_id: str | None = WORK_TASK_ID,
        input_operator: BaseOperator | None = None,
        operator_in_dir: str | None = None,
        operator_out_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.site_variable = site_variable
        self.hosted_site = hosted_site
        self.work_task_id = work_task_id
        if operator_in_dir is None and input_operator is not None:
            operator_in_dir = getattr(input_operator, "operator_out_dir", None) or input_operator.task_id
        self.operator_in_dir = operator_in_dir
        self.operator_out_dir = operator_out_dir or self.task_id

    def site_run(self, context: Context) -> SiteRun:
        """Identity, work item and folders of this task's run (the out dir is created)."""
        return make_site_run(
            context,
            site_variable=self.site_variable,
            hosted_site=self.hosted_site,
            work_task_id=self.work_task_id,
            operator_in_dir=self.operator_in_dir,
            operator_out_dir=self.operator_out_dir,
        )

    def input_path(self, run: SiteRun, name: str) -> Path:
        """``<in dir>/<name>``; fails when the operator has no input folder."""
        if run.in_dir is None:
            raise AirflowFailException(f"task {self.task_id!r}: no operator_in_dir / input_operator given")
        return run.in_dir / name
