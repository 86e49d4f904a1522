#!/usr/bin/env bash
# Hedgehog features and alpha per query in the Triton kernels, on one CUDA GPU (about 5 minutes on an H100):
# the kernel tests on the GPU but the Gluon and warp-specialized ones (their own scripts run those), including
# the realistic-size check of both options against fp64, then benchmarks/bench_linear_options.py at
# (1,12,32760,128), 97% and 95%, with cuDNN SDPA in the same run.
# At most five files go to $OUT (default ./bench_out): gpu.log, pytest_gpu.log, bench_linear_options.log,
# bench_linear_options.json, bench_linear_options.md.
#
#   bash benchmarks/gpu_linear_options.sh          # sources benchmarks/gpu_setup.sh itself
source benchmarks/gpu_setup.sh
set +e -o pipefail  # a failing step must not skip the benchmark after it
export PYTHONUNBUFFERED=1 OUT=${OUT:-bench_out}
mkdir -p "$OUT" && nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > "$OUT/gpu.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.log"
cat "$OUT/gpu.log"
timeout 240 python3 -m pytest -q tests/test_kernels.py -k "not gluon and not warp_specialized" 2>&1 | tail -25 \
  | tee "$OUT/pytest_gpu.log"
timeout 300 python3 benchmarks/bench_linear_options.py --out "$OUT" 2>&1 | tee "$OUT/bench_linear_options.log"
ls -la "$OUT"
