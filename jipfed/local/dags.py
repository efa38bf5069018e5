"""Where the JIP Federated DAG files are: shipped in the package, or ``dags/`` of a checkout."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jipfed

DAG_FILES = ("jipfed_central.py", "jipfed_site.py")


class DagFolderError(FileNotFoundError):
    """No folder with the DAG files was found."""


def _candidates() -> list[Path]:
    package = Path(jipfed.__file__).resolve().parent
    found = [package / "dags"]  # a wheel: package data jipfed/dags/
    spec = importlib.util.find_spec("jipfed.dags")  # an install mapping jipfed.dags to a folder
    if spec is not None and spec.submodule_search_locations:
        found += [Path(p) for p in spec.submodule_search_locations]
    found.append(package.parent / "dags")  # a checkout: the repository's dags/
    return found


def dag_folder() -> Path:
    """The folder holding the DAG files (``jipfed_central.py``, ``jipfed_site.py``).

    Raises:
        DagFolderError: neither the installed package nor a checkout has them (names the places looked).
    """
    candidates = _candidates()
    for folder in candidates:
        if all((folder / name).is_file() for name in DAG_FILES):
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise DagFolderError(f"no folder with {' and '.join(DAG_FILES)} (looked in {looked})")
