#!/usr/bin/env bash
# Make venv $1 hold exactly the pins of lock file $2 (plus this checkout, editable, no deps).
# Idempotent and cheap when nothing changed: a stamp holds the hash of the lock, setup.py and these
# scripts, and the installed versions are compared with the pins on every call (a venv changed by
# hand is noticed and repaired, an old stamp is never trusted alone).
# TORCH_INDEX_URL (optional): an extra index for torch, e.g. PyTorch's CPU wheel index, so that
# torch==2.13.0 resolves to its CPU build instead of PyPI's CUDA build.
# PYTHON (optional): the interpreter new venvs are made from (default python3; the locks are for 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$1
lock=$2
PIP_VERSION=26.3
stamp="$venv/.jipfed-stamp"
want=$(cat "$lock" setup.py scripts/sync-venv.sh scripts/venv_matches.py | sha256sum | cut -d' ' -f1)

if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] \
    && "$venv/bin/python" scripts/venv_matches.py "$lock"; then
  exit 0
fi
start=$(date +%s)
echo "[setup] $venv: installing the pinned set $lock"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
rm -f "$stamp"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q "pip==$PIP_VERSION"
"${pip[@]}" install -q ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r "$lock"
"${pip[@]}" install -q --no-deps -e .
"${pip[@]}" check
"$venv/bin/python" scripts/venv_matches.py "$lock"
echo "$want" > "$stamp"
echo "[setup] $venv ready ($(($(date +%s) - start)) s)"
