#!/usr/bin/env bash
# The sparse-loop ceiling in one GPU run (about 4 minutes on an H100): the warp-specialized sparse launch's tests
# on the card, then benchmarks/bench_sparse_loop.py at (1, 12, 32760, 128), 97 / 95 / 90% sparsity (plain and
# warp-specialized sparse launches, FlexAttention, cuDNN block-sparse where installed, dense SDPA).
# Logs, sparse_loop.json and sparse_loop.md go to $OUT (default ./bench_out).
#
#   bash benchmarks/gpu_sparse_loop.sh          # sources benchmarks/gpu_setup.sh itself
source benchmarks/gpu_setup.sh
set +e  # a failing test must not skip the benchmark
export PYTHONUNBUFFERED=1
set -o pipefail
export OUT=${OUT:-bench_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.log"
timeout 150 python3 -m pytest -q tests/test_kernels.py -k "warp_specialized or launch_config" 2>&1 | tail -15 \
  | tee "$OUT/pytest_gpu.log"
timeout 300 python3 benchmarks/bench_sparse_loop.py --out "$OUT" 2>&1 | tee "$OUT/bench_sparse_loop.log"
ls -la "$OUT"
