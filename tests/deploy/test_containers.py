"""The images' Dockerfiles: hadolint clean, and the promises the deployment relies on.

No Docker engine exists here, so images are linted and their build contexts staged, not built.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jipfed.packaging.context import IMAGES, stage
from tests.deploy.conftest import AF2_PYTHON, REPO, airflow_env

HADOLINT = Path(sys.executable).with_name("hadolint")
DOCKERFILES = {image: REPO / "containers" / image / "Dockerfile" for image in IMAGES}
#: Kaapana builds base-installer locally with the platform; `latest` is its convention.
ALLOWED_LATEST = {"local-only/base-installer:latest"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        if line.lstrip().startswith("#"):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            keyword, _, rest = current.strip().partition(" ")
            joined.append((keyword.upper(), rest.strip()))
        current = ""
    return joined


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions per build stage (a stage starts at FROM); global ARGs before the first FROM are stage 0."""
    result: list[list[tuple[str, str]]] = [[]]
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            result.append([])
        result[-1].append((keyword, rest))
    return result


def arg_defaults(path: Path) -> dict[str, str]:
    return dict(
        rest.split("=", 1) for keyword, rest in instructions(path) if keyword == "ARG" and "=" in rest
    )


@pytest.mark.parametrize("image", IMAGES)
def test_hadolint_clean(image: str) -> None:
    """No finding at any level, style included (each ignore is justified in the file, see below)."""
    result = subprocess.run(
        [str(HADOLINT), "--failure-threshold", "style", "--format", "json", str(DOCKERFILES[image])],
        capture_output=True, text=True,
    )
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("image", IMAGES)
def test_every_hadolint_ignore_is_justified(image: str) -> None:
    lines = DOCKERFILES[image].read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            reason = lines[number - 1].strip()
            assert reason.startswith("#") and "hadolint" not in reason and len(reason) > 20, (
                f"{image} line {number + 1}: an ignore needs a justification comment right above it"
            )


@pytest.mark.parametrize("image", IMAGES)
def test_base_images_are_pinned(image: str) -> None:
    path = DOCKERFILES[image]
    defaults = arg_defaults(path)
    stage_names = set()
    for keyword, rest in instructions(path):
        if keyword != "FROM":
            continue
        ref, *alias = rest.split()
        if alias:
            stage_names.add(alias[-1])
        if ref in stage_names:
            continue
        ref = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], ref)
        name, _, tag = ref.rpartition(":")
        assert name and "/" not in tag, f"{image}: base image {ref} has no tag"
        assert ref in ALLOWED_LATEST or (tag != "latest" and re.search(r"\d", tag)), (
            f"{image}: base image {ref} is not pinned to a version"
        )


# The installer is not listed: it is Kaapana's base-installer (its user is Kaapana's choice), a
# short Job that copies files into the DAGs and plugins volumes.
@pytest.mark.parametrize("image", ["worker", "airflow"])
def test_final_stage_runs_as_non_root_user(image: str) -> None:
    users = [rest for keyword, rest in stages(DOCKERFILES[image])[-1] if keyword == "USER"]
    assert users, f"{image}: the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"{image}: USER {users[-1]} must be a numeric non-root uid"


@pytest.mark.parametrize("image", IMAGES)
def test_nothing_is_downloaded_by_hand(image: str) -> None:
    """No curl / wget, no ADD of a URL: packages come from pip (or the bundle's wheels) at build time."""
    for keyword, rest in instructions(DOCKERFILES[image]):
        assert not re.search(r"\b(curl|wget)\b", rest), f"{image}: {keyword} {rest[:80]}"
        assert keyword != "ADD", f"{image}: use COPY, not ADD"


@pytest.mark.parametrize("image", IMAGES)
def test_kaapana_labels(image: str) -> None:
    labels = " ".join(rest for keyword, rest in stages(DOCKERFILES[image])[-1] if keyword == "LABEL")
    assert f'IMAGE="jipfed-{image}"' in labels and 'VERSION="${VERSION}"' in labels


def test_worker_variant_build_arg_and_entrypoint() -> None:
    path = DOCKERFILES["worker"]
    build, final = stages(path)[1], stages(path)[-1]
    assert ("ARG", "TORCH_VARIANT=cuda") in build
    install = " ".join(rest for keyword, rest in build if keyword == "RUN")
    assert re.search(r"cuda\) .*cpu\) .*TORCH_CPU_INDEX", install), "TORCH_VARIANT must choose the torch index"
    assert "OFFLINE" in install and "--no-index" in install
    assert ("ENTRYPOINT", '["jipfed"]') in final
    assert ("COPY", "--from=build /opt/venv /opt/venv") in final
    env = " ".join(rest for keyword, rest in final if keyword == "ENV")
    assert "PIP_NO_INDEX=1" in env, "the running image must not reach a package index"


def _copy_sources(path: Path) -> list[str]:
    return [
        src for keyword, rest in instructions(path) if keyword == "COPY" and "--from" not in rest
        for src in rest.split()[:-1] if not src.startswith("--")
    ]


@pytest.mark.parametrize("image", IMAGES)
def test_staged_context_has_every_copied_path(image: str, jipfed_wheel: Path, tmp_path: Path) -> None:
    context = stage(image, tmp_path / image, jipfed_wheel)
    for src in _copy_sources(context / "Dockerfile"):
        assert (context / src).exists(), f"{image}: COPY {src} has nothing to copy in the staged context"
    if image in ("worker", "airflow"):
        pins = (context / "requirements.txt").read_text()
        assert "\ntorch==" not in pins, "torch comes from TORCH_VARIANT's index, not the pins"
        assert list((context / "wheels").glob("jip_federated-*.whl"))


def test_installer_layout_loads_in_kaapana_airflow(jipfed_wheel: Path, tmp_path: Path) -> None:
    """Airflow 2.11 (Kaapana's) with the staged folders as its dags and plugins folders: the plugin
    registers, the DAGs import ``jipfed.operators`` from the plugins folder, no import error."""
    context = stage("installer", tmp_path / "installer", jipfed_wheel)
    home = tmp_path / "airflow-home"
    env = airflow_env(home, AIRFLOW__CORE__DAGS_FOLDER=str(context / "dags"),
                      AIRFLOW__CORE__PLUGINS_FOLDER=str(context / "plugins"))
    # .venv-af2 has the suite installed editable; a Kaapana Airflow has not: drop that finder.
    script = (
        "import json, sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
        "from airflow import plugins_manager\n"
        "from airflow.models import DagBag\n"
        "plugins_manager.ensure_plugins_loaded()\n"
        "bag = DagBag(include_examples=False)\n"
        "import jipfed\n"
        "print(json.dumps({'plugins': {p.name: str(p.source) for p in plugins_manager.plugins},\n"
        "  'plugin_errors': {k: str(v) for k, v in plugins_manager.import_errors.items()},\n"
        "  'dag_errors': bag.import_errors, 'dags': sorted(bag.dag_ids), 'jipfed': jipfed.__file__}))\n"
    )
    result = subprocess.run(
        [str(AF2_PYTHON), "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["plugin_errors"] == {}, "the .airflowignore must keep the package out of the plugin scan"
    assert report["plugins"].get("jipfed") == "$PLUGINS_FOLDER/jipfed_airflow_plugin.py"
    assert report["dag_errors"] == {}
    assert {"jipfed_central", "jipfed_site"} <= set(report["dags"])
    assert report["jipfed"].startswith(str(context / "plugins")), "jipfed must come from the plugins folder"
