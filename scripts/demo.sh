#!/usr/bin/env bash
# The README's main-job command: set up (idempotent), then run `crossent demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/crossent demo "$@"
