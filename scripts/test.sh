#!/usr/bin/env bash
# The README's test command: set up (idempotent), lint and format check (ruff), type-check (mypy on src/),
# build the API reference (Sphinx, warnings are errors), then run the whole suite: the
# docstring examples of src/ (--doctest-modules) and tests/, where the drop-in and exactness
# suites run once per CPU backend (the `backend` fixture of tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff check, ruff format --check"
.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/ruff format --check src tests benchmarks scripts
echo "== mypy (src/)"
.venv/bin/mypy
echo "== API reference (docs/api -> docs/_build/api)"
.venv/bin/sphinx-build -W --keep-going -q -b html docs/api docs/_build/api
.venv/bin/python -m pytest "$@"
