#!/usr/bin/env bash
# Train the quality benchmark's original DiT for longer than its default 6.5-minute budget, in the background.
#
# In a shell that can stay open, call run_all.sh directly:
#   TRAIN_ARGS="--max-minutes 12 --steps 100000" benchmarks/quality/run_all.sh OUTDIR train
#   benchmarks/quality/run_all.sh OUTDIR classifier
#
# This script does the same with training detached (benchmarks/detached.sh), for machines reached through
# remote commands with a time limit; run `source benchmarks/gpu_setup.sh` first in each of them:
#   bash benchmarks/quality/gpu_long_train.sh start MINUTES   # starts training, then waits up to 9 minutes
#   bash benchmarks/quality/gpu_long_train.sh wait            # waits up to 9 more minutes or until it ends
#   bash benchmarks/quality/gpu_long_train.sh collect         # waits for the end, trains the classifier,
#                                                             # copies model, classifier and plots to $OUT
#
# MINUTES is the training budget (--max-minutes). TRAIN_EXTRA adds train_dit flags to `start`, e.g.
# TRAIN_EXTRA='--spec {"texture":0.15}' (JSON without spaces: run_all.sh splits TRAIN_ARGS on whitespace).
# WORK (default $TMPDIR/slaconv-long-train) holds the run; OUT (default ./quality_out) receives the files.
set -uo pipefail
WORK=${WORK:-${TMPDIR:-/tmp}/slaconv-long-train}
OUT=${OUT:-quality_out}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
JOB="$HERE/../detached.sh"

case "${1:?usage: gpu_long_train.sh start MINUTES | wait | collect}" in
  start)
    minutes=${2:?minutes}
    bash "$JOB" start "$WORK" "TRAIN_ARGS='--max-minutes $minutes --steps 100000 ${TRAIN_EXTRA:-}' '$HERE/run_all.sh' '$WORK' train"
    bash "$JOB" wait "$WORK"
    ;;
  wait)
    bash "$JOB" wait "$WORK"
    ;;
  collect)
    bash "$JOB" finish "$WORK"
    timeout 300 "$HERE/run_all.sh" "$WORK" classifier > "$WORK/classifier.log" 2>&1
    echo "classifier rc $?"
    mkdir -p "$OUT/model" "$OUT/classifier"
    cp "$WORK"/dit/model/* "$OUT/model/"
    cp "$WORK"/dit/samples.png "$WORK"/dit/loss_curve.png "$WORK"/dit/train_summary.json "$OUT/" 2>/dev/null
    cp "$WORK"/classifier/classifier.safetensors "$WORK"/classifier/classifier.json "$OUT/classifier/" 2>/dev/null
    tail -5 "$WORK/job.log" "$WORK/classifier.log"
    ls -la "$OUT" "$OUT/model" "$OUT/classifier"
    ;;
  *)
    echo "unknown step $1" >&2
    exit 2
    ;;
esac
