#!/usr/bin/env bash
# Train the quality benchmark's original DiT for longer than one 10-minute device call allows.
#
# A device call may last 10 minutes, but a held machine stays with the session for up to 30 minutes as
# long as calls keep coming, and a process started in its own session (setsid) survives the call that
# started it.  So: start training detached, keep the machine busy with `wait` calls, then collect.
#
#   bash benchmarks/quality/gpu_long_train.sh start MINUTES   # call 1: returns after ~9 min, training goes on
#   bash benchmarks/quality/gpu_long_train.sh wait            # call 2, 3, ...: sleeps <= 9 min or until done
#   bash benchmarks/quality/gpu_long_train.sh collect         # last call: classifier, then files into $OUT
#
# TRAIN_EXTRA adds train_dit.py flags to `start`, e.g. TRAIN_EXTRA='--spec {"texture":0.15}' (JSON without
# spaces: run_all.sh splits TRAIN_ARGS on whitespace).
# Every call must start with `source benchmarks/gpu_setup.sh;` (the wheels live in /tmp/site and survive
# between calls on the same machine).  Keep the calls back to back: the machine is given back ~30 s after
# a call ends.  MINUTES is the training budget (--max-minutes); plan MINUTES + 3 minutes of calls in all.
set -uo pipefail
WORK=${WORK:-/tmp/q5long}
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
