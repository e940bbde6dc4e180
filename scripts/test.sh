#!/usr/bin/env bash
# The README's test command: set up (idempotent), lint (ruff), type-check (mypy on src/),
# build the API reference (Sphinx, warnings are errors), then run the whole suite, then run the drop-in and exactness suites again on every CPU
# backend (the automatic choice on CPU is `chunked`; `reference` and `chunked-torch` must
# give the same answers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff check"
.venv/bin/ruff check src tests benchmarks scripts
echo "== mypy (src/)"
.venv/bin/mypy
echo "== API reference (docs/api -> docs/_build/api)"
.venv/bin/sphinx-build -W --keep-going -q -b html docs/api docs/_build/api
.venv/bin/python -m pytest "$@"
for backend in reference chunked-torch; do
  echo "== drop-in and exactness suites with CROSSENT_BACKEND=$backend"
  CROSSENT_BACKEND=$backend .venv/bin/python -m pytest \
    tests/test_exact.py tests/test_parity.py tests/test_properties.py tests/test_extensions.py "$@"
done
