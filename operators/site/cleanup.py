"""CleanupRunFolderOperator: delete the run folder at the end of every run (the caches stay)."""

from __future__ import annotations

import shutil
from typing import Any

from jipfed.operators.compat import AirflowFailException, Context, TriggerRule
from jipfed.operators.site.base import SiteOperator
from jipfed.operators.site.identity import load_identity


class CleanupRunFolderOperator(SiteOperator):
    """Delete ``<workflow_dir>/<run_id>/``, whatever happened upstream (trigger rule ``all_done``).

    It is a teardown task: its success does not hide an upstream failure (as a plain ``all_done``
    leaf would, making the run "success"). Only the run folder goes: the DICOM, NIfTI and preprocessed caches live in ``data_root``
    outside it (links into the cache are removed, never followed). Needs no work item, so it also
    cleans up after a run whose work task failed. Returns (XCom): the folder deleted, or None.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("work_task_id", None)
        super().__init__(**kwargs)
        self.as_teardown()  # the run's state follows the other tasks, not this one
        self.trigger_rule = TriggerRule.ALL_DONE  # as_teardown() sets all_done_setup_success; no setups here

    def execute(self, context: Context) -> str | None:
        identity = load_identity(self.site_variable, self.hosted_site)
        try:
            run_dir = identity.run_dir(context["run_id"])
        except ValueError as exc:
            raise AirflowFailException(str(exc)) from exc
        if not run_dir.exists() and not run_dir.is_symlink():
            self.log.info("site %s: no run folder %s to delete", identity.site_id, run_dir)
            return None
        if run_dir.is_symlink() or not run_dir.is_dir():
            raise AirflowFailException(
                f"site {identity.site_id!r}: {run_dir} is not a folder; not deleting it"
            )
        shutil.rmtree(run_dir)  # symlinks inside are unlinked, not followed
        self.log.info("site %s: deleted the run folder %s", identity.site_id, run_dir)
        return str(run_dir)
