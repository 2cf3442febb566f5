#!/bin/bash
# Everything a short GPU session should check, in one call, each step capped, every log in $OUT:
#   OUT=/tmp/gpu bash scripts/gpu_session.sh            # T_CHECK, T_GRADE, LABS, ... override the caps below
# 1. the tests marked gpu; 2. check_gpu.py (ceilings, decode, roofline, every lab graded); 3. lab 03's figures
# (measure_speculative.py); 4. the tour. Runs on the machine's python3 (its CUDA torch) with this checkout on
# PYTHONPATH: nothing to install but pytest.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/servelab-gpu}; mkdir -p "$OUT"
T0=$(date +%s); step() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
step env; nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
step "tests marked gpu"
timeout "${T_TEST:-120}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_graphs.py tests/test_step_metadata.py \
  tests/test_paged_kernels.py tests/test_timing.py tests/test_grader_gpu_paths.py tests/test_paged_cache.py \
  tests/test_disagg_link.py > "$OUT/pytest_gpu.log" 2>&1; echo "rc=$?" >> "$OUT/pytest_gpu.log"; tail -15 "$OUT/pytest_gpu.log"
step check_gpu
# shellcheck disable=SC2086 # LABS is a list
timeout "${T_CHECK:-1500}" python3 scripts/check_gpu.py --diagnostics --skip-tour \
  --labs ${LABS:-01_batching 02_paged_attention 04_disaggregation 00_warmup 03_speculative} \
  --grade-timeout "${T_GRADE:-300}" --json "$OUT/check_gpu.json" --markdown "$OUT/check_gpu.md" \
  > "$OUT/check_gpu.log" 2>&1; echo "rc=$?" >> "$OUT/check_gpu.log"; grep -v "^diagnostics" "$OUT/check_gpu.log" | tail -50
step "lab 03 figures"
timeout "${T_SPEC:-120}" python3 scripts/measure_speculative.py --gammas 1,2,4 --pairs 3 --prompts 1 \
  --json "$OUT/spec.json" > "$OUT/spec.log" 2>&1; echo "rc=$?" >> "$OUT/spec.log"; tail -12 "$OUT/spec.log"
step tour
timeout "${T_TOUR:-180}" python3 -m servelab.cli tour --device cuda --json "$OUT/tour.json" > "$OUT/tour.log" 2>&1
echo "rc=$?" >> "$OUT/tour.log"; tail -20 "$OUT/tour.log"
step done
