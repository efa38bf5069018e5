"""``jipfed.local.dags.dag_folder``: the DAG files of a checkout (a wheel's are checked by the lead's wheel test)."""

from __future__ import annotations

from pathlib import Path

import pytest

import jipfed
from jipfed.local import dags


def test_a_checkout_finds_the_repository_dags_folder() -> None:
    assert dags.dag_folder() == Path(jipfed.__file__).resolve().parents[1] / "dags"


def test_no_dag_files_anywhere_names_the_places_looked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(dags, "_candidates", lambda: [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(dags.DagFolderError, match="jipfed_central.py and jipfed_site.py") as info:
        dags.dag_folder()
    assert str(tmp_path / "a") in str(info.value) and str(tmp_path / "b") in str(info.value)
