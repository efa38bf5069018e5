"""Fixtures of the security tests, and the hostile-input tally printed at the end of the run.

Every case of ``test_hostile_inputs.py`` records its outcome (``rejected``, ``bounded``,
``accepted`` or ``repaired``) and the recorded reason through the ``tally`` fixture; the terminal
summary prints the counts (tried / rejected / bounded / accepted / repaired) and, with
``JIPFED_SECURITY_SUMMARY=<file>``, writes them as JSON.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable

import pytest
from central.conftest import local_store, secret, serve  # noqa: F401 (fixtures)

OUTCOMES = ("rejected", "bounded", "accepted", "repaired")
RESULTS: list[dict[str, str]] = []


@pytest.fixture
def tally() -> Callable[[str, str, str], None]:
    """``tally(case, outcome, reason)``: record one hostile input's outcome."""

    def record(case: str, outcome: str, reason: str) -> None:
        assert outcome in OUTCOMES and reason, (case, outcome, reason)
        RESULTS.append({"case": case, "outcome": outcome, "reason": reason})

    return record


def summary() -> dict[str, object]:
    counts = Counter(r["outcome"] for r in RESULTS)
    return {"tried": len(RESULTS), **{o: counts.get(o, 0) for o in OUTCOMES}, "cases": RESULTS}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    data = summary()
    terminalreporter.section("hostile inputs")
    terminalreporter.write_line(" ".join(f"{k}={data[k]}" for k in ("tried", *OUTCOMES)))
    for case in RESULTS:
        terminalreporter.write_line(f"  {case['outcome']:9} {case['case']}: {case['reason'][:110]}")
    target = os.environ.get("JIPFED_SECURITY_SUMMARY")
    if target:
        with open(target, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
