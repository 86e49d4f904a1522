#!/usr/bin/env bash
# One device call (~6 min on an H100/H200): kernel tests on the GPU, the attention table (launch-config
# sweep, then both shapes with the best config), then the Wan2.1 model benchmarks (1.3B forward + training
# step, 1.3B and the 14B 4-layer slice with torch.compile'd blocks).  Writes at most 8 files under $OUT.
#   bash benchmarks/gpu_kernel_check.sh
source benchmarks/gpu_setup.sh
export PYTHONUNBUFFERED=1
set -o pipefail
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee "$OUT/bench_model.log"
timeout 90 python3 -m pytest -q -x tests/test_kernels.py 2>&1 | tail -15 | tee "$OUT/pytest_gpu.log"
timeout 240 python3 benchmarks/bench_attention.py --auto --out "$OUT" 2>&1 | tee "$OUT/bench_attention.log" | grep -v "^sweep\|^resources"
rm -f "$OUT/bench_attention.md"
BEST=$(python3 -c "import json;print(json.dumps(json.load(open('$OUT/bench_attention.json'))['config']))" 2>/dev/null || echo '{}')
echo "model benchmarks with CONFIG $BEST" | tee -a "$OUT/bench_model.log"
timeout 100 python3 benchmarks/bench_model.py --model 1.3b --train --kernel-config "$BEST" --out "$OUT" 2>&1 | tee -a "$OUT/bench_model.log"
timeout 80 python3 benchmarks/bench_model.py --model 1.3b --compile --topk 0.03 --quant none int8-fp8 --kernel-config "$BEST" --out "$OUT" 2>&1 | tee -a "$OUT/bench_model.log"
timeout 100 python3 benchmarks/bench_model.py --model 14b --layers 4 --compile --topk 0.05 0.03 --quant int8-fp8 --kernel-config "$BEST" --out "$OUT" 2>&1 | tee -a "$OUT/bench_model.log"
rm -f "$OUT"/bench_model_*.md
ls -la "$OUT"
