#!/usr/bin/env bash
# The project's whole check: lint, types, then the test suite (including the benchmark smoke run).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
ruff check lightning_deadunits tests examples benchmarks
ruff format --check lightning_deadunits tests examples benchmarks
mypy lightning_deadunits
python -m pytest -q -p no:cacheprovider "$@"
