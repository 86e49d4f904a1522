#!/usr/bin/env bash
# The quality table on one CUDA GPU (about 9 minutes on an H100): the shipped checkpoint
# (benchmarks/quality/checkpoint/, or MODEL= and CLASSIFIER=) through the real CLI, then its headline files
# (results.md, results.json, samples.png, run_all.log) copied flat into $OUT (default ./quality_out).
#
#   source benchmarks/gpu_setup.sh; bash benchmarks/quality/gpu_table.sh
#
# TABLE_ARGS passes flags to `python -m slaconv.quality.table` (e.g. TABLE_ARGS="--topk 0.03 --rows ablations"
# for the 97% rows only). WORK (default $TMPDIR/slaconv-quality-table) holds the run. LIMIT=SECONDS stops the
# table after that long; the rows finished by then are kept in results.partial.json.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORK=${WORK:-${TMPDIR:-/tmp}/slaconv-quality-table}
OUT=${OUT:-quality_out}
mkdir -p "$WORK" "$OUT"
LIMITER=()
[[ -n "${LIMIT:-}" ]] && LIMITER=(timeout "$LIMIT")
MODEL=${MODEL:-$HERE/checkpoint/model} CLASSIFIER=${CLASSIFIER:-$HERE/checkpoint/classifier} "${LIMITER[@]}" \
  "$HERE/run_all.sh" "$WORK" table > "$WORK.log" 2>&1
rc=$?
for f in results.md results.json samples.png run_all.log; do
  [[ -f "$WORK/summary/$f" ]] && cp "$WORK/summary/$f" "$OUT/"
done
[[ -f "$WORK/quality/results.partial.json" ]] && cp "$WORK/quality/results.partial.json" "$OUT/"
cp "$WORK.log" "$OUT/gpu_table.log"
echo "table rc $rc"
tail -40 "$WORK/summary/results.md" 2>/dev/null || tail -30 "$WORK.log"
exit $rc
