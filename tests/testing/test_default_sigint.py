"""``airflow standalone`` is launched with SIGINT at its default even from a shell's background job."""

from __future__ import annotations

import subprocess
import sys

from jipfed.local.airflow import with_default_sigint

#: Prints whether Python installed its KeyboardInterrupt handler (it does not when SIGINT starts ignored).
REPORT = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"


def _run_with_sigint_ignored(argv: list[str]) -> str:
    """``argv`` started the way a background job starts it: with SIGINT ignored."""
    done = subprocess.run(
        ["bash", "-c", "trap '' INT; exec \"$@\"", "bash", *argv], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_child_of_a_background_job_inherits_sigint_ignored() -> None:
    assert _run_with_sigint_ignored([sys.executable, "-c", REPORT]) == "False"


def test_the_wrapper_restores_sigint_so_python_handles_it() -> None:
    assert _run_with_sigint_ignored(with_default_sigint([sys.executable, "-c", REPORT])) == "True"
