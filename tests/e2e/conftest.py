"""One federation for every end-to-end test: 3 sites with their own Orthanc and one ``airflow
standalone`` hosting the central DAG, the plugin endpoint and the sites' DAGs (started once per
session; ``tests/conftest.py`` keeps this folder on one xdist worker). Each test runs its own
experiment under its own name, so none needs anything from another one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from jipfed.localfed import LocalFederation


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    federation = LocalFederation(
        tmp_path_factory.mktemp("fed"),
        n_sites=3,
        cases_per_site=4,
        shape=(48, 48, 32),
        progress=False,
        store_connection_in_database=True,
        # 32 x 32 x 24 voxels a case instead of the default 64 x 64 x 48: training costs an eighth
        preprocess={"spacing_mm": [2.0, 2.0, 2.0], "spatial_size": [32, 32, 24]},
    )
    with federation:
        yield federation


@pytest.fixture
def fed(federation: LocalFederation) -> LocalFederation:
    """The session's federation, with Airflow running (started again if an earlier test's crash and
    restart failed), so no test depends on how another one ended."""
    federation.ensure_airflow_running()
    return federation
