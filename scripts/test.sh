#!/usr/bin/env bash
# README command 2: the whole test suite on the primary lock (TF 2.21), then the compatibility
# subset (imports, blocks, short training) on the TF 2.12.1 lock. Creates the venvs if missing.
# Tests run in SIM_MERLIN_TEST_WORKERS pytest-xdist processes (default 2: this machine class has
# 2 cores and many tests wait on subprocesses or single-threaded tracing), a whole file per
# worker (--dist loadfile: module fixtures are built once), files with slow tests first.
# Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=$(command -v python3.11 || command -v python3)
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
"$PYTHON" scripts/setup_env.py --lock tf2.21
WORKERS=(-n "${SIM_MERLIN_TEST_WORKERS:-2}" --dist loadfile)
.venv/bin/python -m pytest "${WORKERS[@]}" "$@"
"$PYTHON" scripts/setup_env.py --lock tf2.12
.venv-tf2.12/bin/python -m pytest "${WORKERS[@]}" -m compat_lock "$@"
