#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: Debian packages (when root), then three venvs, each
# holding exactly one pinned set from requirements/ (refresh the pins with scripts/lock.py):
#   .venv        Airflow 3.3 + the worker stack + test tools (requirements/main.txt)
#   .venv-af2    Airflow 2.11, what Kaapana 0.6 ships, + the worker stack (requirements/airflow2.txt)
#   .venv-sched  Airflow 2.11 + the Kubernetes provider, no torch/DICOM stack: the DAGs must parse
#                in a scheduler image like this (requirements/scheduler.txt)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
command -v dcmdump >/dev/null 2>&1 || need_apt+=(dcmtk)
# headless browser for the experiment pages' browser test (tests/ui)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[setup] apt-get install ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "[setup] not root: please install ${need_apt[*]} (Debian packages) yourself" >&2
  fi
fi

bash scripts/sync-venv.sh "${VENV:-.venv}" requirements/main.txt
bash scripts/sync-venv.sh "${VENV_AF2:-.venv-af2}" requirements/airflow2.txt
bash scripts/sync-venv.sh "${VENV_SCHED:-.venv-sched}" requirements/scheduler.txt
