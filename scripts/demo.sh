#!/usr/bin/env bash
# The main demo: trains a small MobileNet-like CNN on scikit-learn's digits with Adam and with SGD, and shows
# the zero kernels Adam leaves behind. Shows which run is training with a progress bar each, then writes
# TensorBoard logs, report.md and report.html under runs/zero_kernels/ and prints the commands that open them.
set -euo pipefail
echo "deadunits demo: preparing the environment (.venv; the first time installs torch and this package)..."
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
echo "deadunits demo: training Adam, then SGD (about three minutes on 2 CPU cores)"
# Unbuffered: progress shows as it happens even when the output is piped (| tee, CI logs).
PYTHONUNBUFFERED=1 python examples/zero_kernels.py "$@"
