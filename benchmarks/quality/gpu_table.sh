#!/usr/bin/env bash
# One device call (~5-6 min predicted on an H100): the quality table of the shipped checkpoint
# (benchmarks/quality/checkpoint/, or MODEL= and CLASSIFIER=) through the real CLI, with its headline files copied flat into $OUT
# (results.md, results.json, samples.png, run_all.log: within the 8 files a call brings back).
#   source benchmarks/gpu_setup.sh; bash benchmarks/quality/gpu_table.sh
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORK=${WORK:-/tmp/qtable}
MODEL=${MODEL:-$HERE/checkpoint/model} CLASSIFIER=${CLASSIFIER:-$HERE/checkpoint/classifier} timeout "${LIMIT:-560}" \
  "$HERE/run_all.sh" "$WORK" table > "$WORK.log" 2>&1
rc=$?
for f in results.md results.json samples.png run_all.log; do
  [[ -f "$WORK/summary/$f" ]] && cp "$WORK/summary/$f" "${OUT:?}/"
done
# cut short: the rows finished so far
[[ -f "$WORK/quality/results.partial.json" ]] && cp "$WORK/quality/results.partial.json" "$OUT/"
cp "$WORK.log" "$OUT/gpu_table.log"
echo "table rc $rc"
tail -40 "$WORK/summary/results.md" 2>/dev/null || tail -30 "$WORK.log"
exit $rc
