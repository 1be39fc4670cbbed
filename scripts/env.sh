# Source me: makes .venv (if missing) with torch 2.13.0 (CPU) installed first, then this package with its extras.
# torch goes first and pinned: an unpinned torch would pull a multi-GB CUDA build.
set -e
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$root/.venv/bin/python" ]; then
    python3 -m venv "$root/.venv"
fi
. "$root/.venv/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e "$root[dev]"
cd "$root"
