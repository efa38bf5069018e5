#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: Debian packages (when root), .venv, torch pin, project.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

need_apt=()
command -v Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
command -v dcmdump >/dev/null 2>&1 || need_apt+=(dcmtk)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[setup] apt-get install ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "[setup] not root: please install ${need_apt[*]} (Debian packages) yourself" >&2
  fi
fi

# Airflow 2.11 venv (what Kaapana 0.6 ships): the DAGs must import and dag.test() there too.
bash scripts/setup-airflow2.sh

stamp="$VENV/.jipfed-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt setup.py ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch first and pinned: otherwise pip resolves monai's torch requirement to a multi-GB CUDA build.
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e ".[test]"
touch "$stamp"
echo "[setup] environment ready in $VENV"
