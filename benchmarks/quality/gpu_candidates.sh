#!/usr/bin/env bash
# The candidate comparison on one CUDA GPU, time-boxed to fit one 10-minute call: the shipped checkpoint
# (benchmarks/quality/checkpoint/, or MODEL= and CLASSIFIER=) converted by the real CLI once per candidate,
# sparsity and seed, rows running as parallel processes that share the GPU; then its headline files
# (results.md, results.json, loss_vs_sparsity.png, candidates.log, row_logs.txt) copied flat into $OUT
# (default ./candidates_out).
#
#   source benchmarks/gpu_setup.sh; bash benchmarks/quality/gpu_candidates.sh
#
# ARGS passes flags to `python -m slaconv.quality.candidates` (e.g. ARGS="--candidates paper,hedgehog --topk 0.03"
# or ARGS="--define 'lr3:calibration.stage2.lr=3e-4'"). WORK (default $TMPDIR/slaconv-candidates) holds the run.
# MAX_MINUTES (default 8) ends the comparison: no row starts that the median finished row says cannot end in
# time, the running ones are stopped then, and every finished row is kept and summarised. LIMIT=SECONDS
# (default 570) is the hard stop around everything.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORK=${WORK:-${TMPDIR:-/tmp}/slaconv-candidates}
OUT=${OUT:-candidates_out}
PY=${PYTHON:-python3}
mkdir -p "$WORK" "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
eval "ARGV=(${ARGS:-})"  # ARGS may quote a --define
timeout "${LIMIT:-570}" "$PY" -m slaconv.quality.candidates \
  --model "${MODEL:-$HERE/checkpoint/model}" --classifier "${CLASSIFIER:-$HERE/checkpoint/classifier}" \
  --out "$WORK" --max-minutes "${MAX_MINUTES:-8}" "${ARGV[@]}" > "$WORK.log" 2>&1
rc=$?
for f in results.md results.json loss_vs_sparsity.png; do
  [[ -f "$WORK/$f" ]] && cp "$WORK/$f" "$OUT/"
done
cp "$WORK.log" "$OUT/candidates.log"
# every row's own log in one file, so a slow or failed row can be read afterwards
find "$WORK" -name row.log -print0 2>/dev/null | sort -z | xargs -0 -r tail -n 40 > "$OUT/row_logs.txt"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >> "$OUT/candidates.log" 2>/dev/null
echo "candidates rc $rc"
head -60 "$WORK/results.md" 2>/dev/null || tail -30 "$WORK.log"
exit $rc
