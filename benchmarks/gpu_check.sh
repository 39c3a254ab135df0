#!/usr/bin/env bash
# The GPU check in one call: benchmarks/gpu_check.sh [OUT_DIR] [--dry-run]   (OUT_DIR defaults to $OUT)
# Needs only torch and triton (no verl, nothing downloaded); <= 8 min on one H100/H200. Writes OUT_DIR/gpu_check.json
# and OUT_DIR/gpu_check.txt: the GPU tests, a CUDA sync-debug run of the Top-K op path, and the vocab-parallel
# benchmark at N = 4096, 16384, 32768. torch.cuda.empty_cache is never called; its cost is not measured.
# --dry-run: tiny sizes on the CPU, GPU-only parts skipped with a message (tests/test_gpu_check_on_cpu.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# 470 s: the script stops starting benchmark sizes at 450 s; the hard limit leaves room to write the report
exec timeout 470 "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
