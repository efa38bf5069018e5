#!/usr/bin/env bash
# Idempotent set-up of .venv-af2: Airflow 2.11 + common-compat + the project, to check that the
# DAG files and operators still import and `dag.test()` on Airflow 2 (tests/airflow/test_airflow2.py).
# Airflow 2.11 needs its own venv (SQLAlchemy 1.4, Flask 2.2); it resolves on Python 3.11 without
# a constraints file.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV_AF2:-.venv-af2}
PYTHON=${PYTHON:-python3}

stamp="$VENV/.jipfed-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt setup.py ] && [ "$stamp" -nt "$0" ]; then
  exit 0
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch first and pinned: otherwise pip resolves monai's torch requirement to a multi-GB CUDA build.
"$VENV/bin/pip" install -q torch==2.13.0
# One resolver run for Airflow and the project so that both agree on shared dependencies.
"$VENV/bin/pip" install -q "apache-airflow==2.11.0" apache-airflow-providers-common-compat -e .
"$VENV/bin/pip" check
touch "$stamp"
echo "[setup-airflow2] environment ready in $VENV ($(($(date +%s) - start)) s)"
