#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite (what CI runs). Extra args go to pytest.
#   scripts/test.sh            every test
#   scripts/test.sh --fast     the unit and quick tests (no training, no clusters): minutes, for work in progress
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then args+=(-m "not slow"); else args+=("$arg"); fi
done
bash scripts/setup.sh
export PYTHONDONTWRITEBYTECODE=1 TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m pytest -ra --durations=15 "${args[@]}"
