#!/usr/bin/env bash
# The tail-estimator study (python -m slaconv.quality.tail_study) on one CUDA GPU, time-boxed: the study gets
# MINUTES (default 5) of wall clock and shortens its Hedgehog fits and held-out sets to end within it, so the
# whole command takes about MINUTES + 20 s.  The model runs under bf16 autocast, every estimator in fp32.
#
#   source benchmarks/gpu_setup.sh; bash benchmarks/quality/gpu_tail_study.sh
#   MODEL=DIR bash benchmarks/quality/gpu_tail_study.sh        # another original (a diffusers folder whose
#                                                               # parent holds its train_summary.json)
#
# Writes $OUT/tail_study/ (OUT defaults to ./tail_out): results.md, results.json and tail_study.log; prints
# the headline table at the end.  TAIL_ARGS passes further flags to the study (they override the ones here).
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODEL=${MODEL:-$HERE/checkpoint/model}
OUT=${OUT:-tail_out}
DEST="$OUT/tail_study"
mkdir -p "$DEST"
# shellcheck disable=SC2086  # TAIL_ARGS is a list of flags
python3 -m slaconv.quality.tail_study --model "$MODEL" --out "$DEST" --device cuda \
  --max-minutes "${MINUTES:-5}" --heldout 60 --stats-videos 1 3 --train-videos 16 --fit-blocks 64 \
  --hedgehog-width 32 --hedgehog-steps 400 --hedgehog-lr 1e-2 --threads 8 ${TAIL_ARGS:-} \
  > "$DEST/tail_study.log" 2>&1
rc=$?
echo "tail study rc $rc"
if [[ -f "$DEST/results.md" ]]; then
  sed -n '/^## 3\./,$p' "$DEST/results.md"
else
  tail -30 "$DEST/tail_study.log"
fi
exit $rc
