#!/usr/bin/env bash
# The main demo: trains a small MobileNet-like CNN on scikit-learn's digits with Adam and with SGD, and shows
# the zero kernels Adam leaves behind. Writes TensorBoard logs and report.md under runs/zero_kernels/.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python examples/zero_kernels.py "$@"
