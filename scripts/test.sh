#!/usr/bin/env bash
# README command 2: the whole test suite on the primary lock (TF 2.21), then the compatibility
# subset (imports, blocks, short training) on the TF 2.12.1 lock. Creates the venvs if missing.
# Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=$(command -v python3.11 || command -v python3)
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
"$PYTHON" scripts/setup_env.py --lock tf2.21
.venv/bin/python -m pytest "$@"
"$PYTHON" scripts/setup_env.py --lock tf2.12
.venv-tf2.12/bin/python -m pytest -m compat_lock "$@"
