#!/usr/bin/env bash
# The Wan2.1-14B architecture at full depth (40 blocks, 720p) under FSDP, longer than one 10-minute device call:
# started detached on a held multi-GPU machine, then collected (same pattern as quality/gpu_long_train.sh).
#
#   bash benchmarks/gpu_fsdp_full.sh start [PROCESSES] [BLOCKS]   # call 1 (kind nvidia-h200-x4): returns after ~9 min
#   bash benchmarks/gpu_fsdp_full.sh wait                         # calls 2, ...: <= 9 min each, until the run ends
#   bash benchmarks/gpu_fsdp_full.sh collect                      # last call: bench_multigpu.{json,md,_logs.txt} -> $OUT
#
# Every call starts with `source benchmarks/gpu_setup.sh;`; keep calls back to back (the machine is given back
# ~30 s after a call ends).  The 14B recipe precomputes the teacher's targets (calibration.stage2.teacher), which
# is what should let 40 blocks fit 4 x H200 (benchmarks/RESULTS.md, "FSDP on 4 GPUs").
set -uo pipefail
WORK=${WORK:-/tmp/fsdpfull}
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
    cp "$WORK"/out/* "${OUT:?}/" 2>/dev/null
    tail -30 "$WORK/job.log"
    ls -la "$OUT"
    ;;
  *)
    echo "unknown step $1" >&2
    exit 2
    ;;
esac
