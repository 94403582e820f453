#!/usr/bin/env bash
# CTest entry for the server tests (Python clients against the real `zimage serve`):
#   tests/server/run.sh FILE...   runs pytest on FILE... with ./venv's Python.
# Exits 77 (CTest: skipped) only when the venv is absent; scripts/setup.sh creates it.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${ZIMAGE_TEST_VENV:-$ROOT/venv}/bin/python
if [ ! -x "$PY" ]; then
  echo "skipped: no $PY (scripts/setup.sh creates the test venv)"
  exit 77
fi
cd "$ROOT"
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
