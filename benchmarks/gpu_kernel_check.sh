#!/usr/bin/env bash
# One device call (~8 min on an H100): attention table (profile + both shapes), kernel tests on the GPU,
# then the Wan2.1 model benchmarks (1.3B forward + training step, 14B 4-layer slice, 1.3B with
# torch.compile'd blocks).  Writes at most 8 files under $OUT.
#   bash benchmarks/gpu_kernel_check.sh
source benchmarks/gpu_setup.sh
export PYTHONUNBUFFERED=1
set -o pipefail
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee "$OUT/bench_model.log"
timeout 220 python3 benchmarks/bench_attention.py --profile --out "$OUT" 2>&1 | tee "$OUT/bench_attention.log" | grep -v "^sweep"
rm -f "$OUT/bench_attention.md"
timeout 120 python3 -m pytest -q -x tests/test_kernels.py 2>&1 | tail -15 | tee "$OUT/pytest_gpu.log"
timeout 110 python3 benchmarks/bench_model.py --model 1.3b --train --out "$OUT" 2>&1 | tee -a "$OUT/bench_model.log"
timeout 60 python3 benchmarks/bench_model.py --model 14b --layers 4 --out "$OUT" 2>&1 | tee -a "$OUT/bench_model.log"
timeout 120 python3 benchmarks/bench_model.py --model 1.3b --compile --topk 0.03 --quant none int8-fp8 --out "$OUT" 2>&1 | tee -a "$OUT/bench_model.log"
rm -f "$OUT"/bench_model_*.md
ls -la "$OUT"
