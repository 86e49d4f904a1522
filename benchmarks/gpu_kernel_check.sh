#!/usr/bin/env bash
# One device call: kernel tests on the GPU, then the attention table at the Wan2.1-1.3B shape.
#   bash benchmarks/gpu_kernel_check.sh        (writes under $OUT)
source benchmarks/gpu_setup.sh
export PYTHONUNBUFFERED=1
set -o pipefail
timeout 240 python3 -m pytest -q tests/test_kernels.py 2>&1 | tail -15 | tee "$OUT/pytest_gpu.log"
timeout 240 python3 benchmarks/bench_attention.py --quick --out "$OUT" 2>&1 | tail -30 | tee "$OUT/bench_attention.log"
