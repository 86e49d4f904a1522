#!/usr/bin/env bash
# Stage 2 on the full-depth Wan2.1-14B architecture (40 blocks, 720p) under FSDP, on one host with 4 or more
# CUDA GPUs. In a shell that can stay open for the whole run, call the benchmark directly:
#
#   source benchmarks/gpu_setup.sh
#   python benchmarks/bench_multigpu.py --out OUT --fsdp-only --fsdp-processes 4 --fsdp-layers 40 --budget-s 1700
#
# This script runs the same command in the background (benchmarks/detached.sh), for machines reached through
# remote commands with a time limit; run `source benchmarks/gpu_setup.sh` first in each of them:
#
#   bash benchmarks/gpu_fsdp_full.sh start [PROCESSES] [BLOCKS]   # starts it, then waits up to 9 minutes
#   bash benchmarks/gpu_fsdp_full.sh wait                         # waits up to 9 more minutes; GPU memory in use
#   bash benchmarks/gpu_fsdp_full.sh collect                      # waits for the end; bench_multigpu.* -> $OUT
#
# WORK (default $TMPDIR/slaconv-fsdp-full) holds the run; OUT (default ./bench_out) receives the results. The 14B
# recipe precomputes the teacher's targets (calibration.stage2.teacher), which by arithmetic on the measured
# slices should let 40 blocks fit 4 x H200 (benchmarks/RESULTS.md, "Calibration cost and multi-GPU calibration").
set -uo pipefail
WORK=${WORK:-${TMPDIR:-/tmp}/slaconv-fsdp-full}
OUT=${OUT:-bench_out}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

case "${1:?usage: gpu_fsdp_full.sh start [PROCESSES] [BLOCKS] | wait | collect}" in
  start)
    procs=${2:-4}
    blocks=${3:-40}
    bash "$HERE/detached.sh" start "$WORK" "python3 '$HERE/bench_multigpu.py' --out '$WORK/out' --work '$WORK/work' \
      --fsdp-only --fsdp-processes $procs --fsdp-layers $blocks --budget-s 1700"
    bash "$HERE/detached.sh" wait "$WORK"
    ;;
  wait)
    bash "$HERE/detached.sh" wait "$WORK"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader | tr '\n' ' '; echo
    ;;
  collect)
    bash "$HERE/detached.sh" finish "$WORK"
    mkdir -p "$OUT"
    cp "$WORK"/out/* "$OUT/" 2>/dev/null
    tail -30 "$WORK/job.log"
    ls -la "$OUT"
    ;;
  *)
    echo "unknown step $1" >&2
    exit 2
    ;;
esac
