#!/usr/bin/env bash
# Kernel check on one GPU (<= ~9.5 min on an H100/H200): kernel tests on the GPU, the 97% attention table
# of shape (1,12,32760,128) after the launch sweep (bench_attention.py --auto: each launch variant is a
# sweep row; the table uses the fastest LaunchConfig), then the Wan2.1-1.3B training step and compiled
# forward with those launch settings.  Writes at most 8 files under $OUT.  The (1,40,75600,128) rows and
# the 14B slice run separately (`python benchmarks/bench_attention.py --topk 0.03 --config "$BEST"` and
# bench_model.py --model 14b --layers 4 --compile --kernel-config "$BEST").
#   bash benchmarks/gpu_kernel_check.sh
source benchmarks/gpu_setup.sh
set +e  # a failing step must not skip the benchmarks after it
export PYTHONUNBUFFERED=1
set -o pipefail
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee "$OUT/bench_model.log"
timeout 120 python3 -m pytest -q tests/test_kernels.py 2>&1 | tail -15 | tee "$OUT/pytest_gpu.log"
timeout 300 python3 benchmarks/bench_attention.py --auto --quick --topk 0.03 --out "$OUT" 2>&1 | tee "$OUT/bench_attention.log" | grep -v "^resources"
rm -f "$OUT/bench_attention.md"
BEST=$(python3 -c "import json;print(json.dumps(json.load(open('$OUT/bench_attention.json'))['config']))" 2>/dev/null || echo '{}')
echo "model benchmarks with launch settings $BEST" | tee -a "$OUT/bench_model.log"
timeout 100 python3 benchmarks/bench_model.py --model 1.3b --train --kernel-config "$BEST" --out "$OUT" 2>&1 | tee -a "$OUT/bench_model.log"
timeout 80 python3 benchmarks/bench_model.py --model 1.3b --compile --topk 0.03 --quant none int8-fp8 --kernel-config "$BEST" --out "$OUT" 2>&1 | tee -a "$OUT/bench_model.log"
rm -f "$OUT"/bench_model_*.md
ls -la "$OUT"
