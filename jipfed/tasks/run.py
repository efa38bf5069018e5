"""One site task's view of its run: identity, folders, work item (Kaapana's folder layout).

Folder convention (as Kaapana's operators, so ours chain with theirs)::

    <workflow_dir>/<run_id>/                      the run folder (WORKFLOW_DIR), deleted at the end
    <workflow_dir>/<run_id>/<operator_out_dir>/   batch-level output of one task (default: its task id)
    <workflow_dir>/<run_id>/batch/<series>/<operator_out_dir>/   per-series output (BATCH_NAME)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jipfed.tasks.errors import TaskFailed
from jipfed.tasks.identity import SiteIdentity

if TYPE_CHECKING:  # the federation modules import torch: only when a step runs
    from jipfed.federation.dispatch import WorkItem

#: Kaapana's name of the folder holding one sub-folder per series of a run.
BATCH_NAME = "batch"


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as JSON, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_json(path: Path, what: str) -> Any:
    """Read a JSON file an upstream task wrote; TaskFailed when it is missing."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TaskFailed(f"{what} not found at {path}: did the upstream task run?") from None


@dataclass(frozen=True)
class SiteRun:
    """Who the site is, what it works on (``work_data``: ``WorkItem.to_dict()``), and its folders."""

    identity: SiteIdentity
    run_dir: Path
    in_dir: Path | None
    out_dir: Path
    work_data: Mapping[str, Any] | None = None

    @property
    def where(self) -> str:
        """``site ..., experiment ..., round ..., step ...`` for messages."""
        text = f"site {self.identity.site_id!r}"
        ticket = (self.work_data or {}).get("ticket")
        if isinstance(ticket, Mapping):
            text += (
                f", experiment {ticket.get('experiment')!r}, round {ticket.get('round')}, "
                f"step {ticket.get('step')}"
            )
        return text

    @cached_property
    def work(self) -> WorkItem | None:
        """The work item (parsed on first use: it imports the federation code)."""
        if self.work_data is None:
            return None
        from jipfed.federation.dispatch import WorkItem

        try:
            return WorkItem.from_dict(self.work_data)
        except (KeyError, TypeError, ValueError) as exc:
            raise TaskFailed(f"{self.where}: the work item is not valid: {exc!r}") from exc

    def require_work(self) -> WorkItem:
        """The work item; TaskFailed when the run has none."""
        work = self.work
        if work is None:
            raise TaskFailed(f"{self.where}: this task needs a work item and has none")
        return work

    def input_path(self, name: str) -> Path:
        """``<in dir>/<name>``; TaskFailed when the task has no input folder."""
        if self.in_dir is None:
            raise TaskFailed(f"{self.where}: no operator_in_dir / input_operator given")
        return self.in_dir / name


def make_run(
    identity: SiteIdentity,
    run_dir: Path,
    *,
    operator_in_dir: str | None,
    operator_out_dir: str,
    work_data: Mapping[str, Any] | None = None,
) -> SiteRun:
    """The run with its out dir created."""
    out_dir = run_dir / operator_out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    in_dir = run_dir / operator_in_dir if operator_in_dir else None
    return SiteRun(identity=identity, run_dir=run_dir, in_dir=in_dir, out_dir=out_dir, work_data=work_data)
