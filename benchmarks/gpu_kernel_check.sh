#!/usr/bin/env bash
# Kernel check on one CUDA GPU (about 9 minutes on an H100): the kernel tests on the GPU, the launch-config
# sweep (each LaunchConfig variant a row) and the 97% attention table at (1,12,32760,128) with the fastest, then the Wan2.1-1.3B training
# step and compiled forward with that config. Logs, JSON and markdown tables go to $OUT (default ./bench_out).
#
#   bash benchmarks/gpu_kernel_check.sh          # sources benchmarks/gpu_setup.sh itself
#
# The (1,40,75600,128) rows and the Wan2.1-14B slice are separate commands: see benchmarks/RESULTS.md
# (`python benchmarks/bench_attention.py --no-check --rep 50`, `python benchmarks/bench_model.py --model 14b ...`).
source benchmarks/gpu_setup.sh
set +e  # a failing step must not skip the benchmarks after it
export PYTHONUNBUFFERED=1
set -o pipefail
export OUT=${OUT:-bench_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee "$OUT/bench_model.log"
timeout 180 python3 -m pytest -q tests/test_kernels.py 2>&1 | tail -15 | tee "$OUT/pytest_gpu.log"
timeout 300 python3 benchmarks/bench_attention.py --auto --quick --topk 0.03 --out "$OUT" 2>&1 | tee "$OUT/bench_attention.log" | grep -v "^resources"
BEST=$(python3 -c "import json;print(json.dumps(json.load(open('$OUT/bench_attention.json'))['config']))" 2>/dev/null || echo '{}')
echo "model benchmarks with launch settings $BEST" | tee -a "$OUT/bench_model.log"
timeout 100 python3 benchmarks/bench_model.py --model 1.3b --train --kernel-config "$BEST" --out "$OUT" 2>&1 | tee -a "$OUT/bench_model.log"
timeout 80 python3 benchmarks/bench_model.py --model 1.3b --compile --topk 0.03 --quant none int8-fp8 --kernel-config "$BEST" --out "$OUT" 2>&1 | tee -a "$OUT/bench_model.log"
ls -la "$OUT"
