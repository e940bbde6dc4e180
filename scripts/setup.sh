#!/usr/bin/env bash
# Create .venv with the pinned development environment (constraints/dev.txt) and crossent in it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints/dev.txt torch
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints/dev.txt -e ".[dev]"
