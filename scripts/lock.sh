#!/usr/bin/env bash
# Regenerate requirements/<lock>.lock from requirements/<lock>.in in a throw-away venv.
# Usage: scripts/lock.sh tf2.21|tf2.12     (review the diff, then run scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
lock=${1:?usage: scripts/lock.sh tf2.21|tf2.12}
[ -f "requirements/$lock.in" ] || { echo "no requirements/$lock.in" >&2; exit 2; }
PYTHON=$(command -v python3.11 || command -v python3)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --disable-pip-version-check -q "$(grep '^pip==' "requirements/$lock.in")"
"$tmp/venv/bin/pip" install --disable-pip-version-check -r "requirements/$lock.in"
"$tmp/venv/bin/pip" check
{
  echo "# Exact environment for the $lock lock: every package, installed with --no-deps by"
  echo "# scripts/setup_env.py (the resolver picks nothing). Made from requirements/$lock.in by"
  echo "# scripts/lock.sh $lock ('pip install -r' in a fresh Python 3.11 venv, then 'pip freeze --all',"
  echo "# minus horovod, which scripts/build_horovod.py compiles, and sim-merlin itself)."
  "$tmp/venv/bin/pip" freeze --all | grep -v -i -E '^(horovod|sim-merlin)(==| @)|^-e '
} > "requirements/$lock.lock.partial"
mv "requirements/$lock.lock.partial" "requirements/$lock.lock"
echo "wrote requirements/$lock.lock"
