"""How a task function says why it stopped; operators and ``jipfed task`` map these to Airflow / exit codes."""

from __future__ import annotations


class TaskError(Exception):
    """The step failed and may succeed on a retry (a service down, a timeout)."""


class TaskFailed(TaskError):
    """The step failed for good: retrying with the same input fails again (bad config, no data)."""


class TaskSkipped(Exception):
    """Nothing to do in this run (Kaapana: exit code 126)."""


#: ``jipfed task`` exit codes (Kaapana reads 126 as "skipped").
EXIT_OK = 0
EXIT_RETRY = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_SKIPPED = 126
