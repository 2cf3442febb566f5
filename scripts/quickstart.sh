#!/usr/bin/env bash
# Set up servelab in ./.venv and run the main job (`servelab tour`) on the shipped default model.
#   bash scripts/quickstart.sh            # set up + tour
#   bash scripts/quickstart.sh --setup    # set up only (CI)
#   bash scripts/quickstart.sh --vllm     # also install vLLM (a CUDA machine; the labs' side-by-side comparisons)
#   bash scripts/quickstart.sh --dry-run  # say what it would do here, do nothing
# Needs Python >= 3.10. Set PYTHON=/path/to/python to choose the interpreter, SERVELAB_TORCH to pin torch.
#
# On a CUDA machine whose Python already has a CUDA build of torch (the usual cloud GPU image), the
# environment is made with --system-site-packages: it keeps that torch and its compiled Triton instead of
# downloading a CPU build over them. SERVELAB_SETUP=cpu forces the CPU path, SERVELAB_SETUP=gpu the GPU one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SETUP_ONLY=0 VLLM=0 DRY=0
for arg in "$@"; do
  case "$arg" in
    --setup) SETUP_ONLY=1 ;;
    --vllm) VLLM=1 ;;
    --dry-run) DRY=1 ;;
    *) echo "quickstart.sh: unknown option $arg (use --setup, --vllm, --dry-run)" >&2; exit 64 ;;
  esac
done
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "servelab needs Python >= 3.10, found " + sys.version.split()[0])'
MODE=${SERVELAB_SETUP:-}
if [ -z "$MODE" ]; then
  if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)' 2>/dev/null; then
    MODE=gpu
  else
    MODE=cpu
  fi
fi
case "$MODE" in cpu|gpu) ;; *) echo "quickstart.sh: SERVELAB_SETUP must be cpu or gpu, got $MODE" >&2; exit 64 ;; esac
EXTRAS=dev
[ "$VLLM" = 1 ] && EXTRAS=dev,gpu
run() { if [ "$DRY" = 1 ]; then echo "would run: $*"; else "$@"; fi; }
echo "servelab setup: $MODE mode ($( [ "$MODE" = gpu ] && echo "keeps this Python's CUDA torch and Triton" || echo "CPU build of torch"))"
if [ ! -x .venv/bin/python ]; then
  if [ "$MODE" = gpu ]; then run "$PYTHON" -m venv --system-site-packages .venv; else run "$PYTHON" -m venv .venv; fi
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check"
if [ "$MODE" = cpu ] && ! { [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch' 2>/dev/null; }; then
  # An explicit version: a bare `torch` may pull a multi-GB CUDA build where a CPU build is on hand.
  run $PIP install "torch==${SERVELAB_TORCH:-2.13.0}"
fi
run $PIP install -e ".[$EXTRAS]"
run .venv/bin/python -m ipykernel install --sys-prefix --name python3
if [ "$SETUP_ONLY" = 0 ]; then
  run .venv/bin/servelab tour
fi
