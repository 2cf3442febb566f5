#!/usr/bin/env bash
# Set up servelab in ./.venv and run the main job (`servelab tour`) on the shipped default model.
#   bash scripts/quickstart.sh            # set up + tour
#   bash scripts/quickstart.sh --setup    # set up only (CI)
# Needs Python >= 3.10. Set PYTHON=/path/to/python to choose the interpreter, SERVELAB_TORCH to pin torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "servelab needs Python >= 3.10, found " + sys.version.split()[0])'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check"
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  # An explicit version: a bare `torch` may pull a multi-GB CUDA build where a CPU build is on hand.
  $PIP install "torch==${SERVELAB_TORCH:-2.13.0}"
fi
$PIP install -e ".[dev]"
.venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
if [ "${1:-}" != "--setup" ]; then
  .venv/bin/servelab tour
fi
