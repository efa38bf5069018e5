"""Suite-wide: the longest test files first, so parallel workers (pytest-xdist, ``--dist loadfile``)
start them at once instead of finishing with one of them alone; files sharing a session fixture on
one worker; a port where nothing listens."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

#: Test files (or folders) by falling duration on 2 cores; the rest keep their collection order after them.
LONGEST_FIRST = (
    "tests/e2e/",
    "tests/airflow/test_central_dag.py",
    "tests/airflow/test_site_dag.py",
    "tests/ui/",
    "tests/deploy/",
    "tests/airflow/test_standalone.py",
    "tests/airflow/test_secure_aggregation.py",
    "tests/imaging/test_transfer_syntaxes.py",
    "tests/operators/test_central_work.py",
    "tests/airflow/test_airflow2.py",
    "tests/airflow/test_compat.py",
)


def _rank(item: pytest.Item) -> int:
    path = item.nodeid.split("::", 1)[0]
    return next((i for i, prefix in enumerate(LONGEST_FIRST) if path.startswith(prefix)), len(LONGEST_FIRST))


#: Folders whose files share session fixtures (tests/ui: one ``airflow standalone`` and one store of
#: trained experiments; tests/e2e: one federation): one xdist work unit, so one worker starts them
#: once instead of each worker.
SHARED_SESSION_SCOPES = ("tests/e2e/", "tests/ui/")


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile``, except that each folder of :data:`SHARED_SESSION_SCOPES` is one unit."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedSessionScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return next((scope for scope in SHARED_SESSION_SCOPES if path.startswith(scope)), path)

    return SharedSessionScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest files first; a stable sort keeps each file's tests (and module fixtures) together in order."""
    items.sort(key=_rank)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 where nothing listens, for the whole test: it is bound (so no other
    process can take it) but not listening, so connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
