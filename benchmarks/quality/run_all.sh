#!/usr/bin/env bash
# The SLA2 quality benchmark end to end on one GPU: train the DiT, train the classifier, build the table.
#
#   benchmarks/quality/run_all.sh OUTDIR [all|train|classifier|table]      (default: all)
#
# Environment:
#   PYTHON=python3              interpreter (torch, triton, diffusers, accelerate, click, pyyaml, pillow)
#   MODEL=DIR                   use this trained checkpoint instead of OUTDIR/dit/model (table; the
#                               classifier step scores its samples)
#   CLASSIFIER=DIR              table only: use this classifier instead of OUTDIR/classifier
#   TRAIN_ARGS / CLF_ARGS / TABLE_ARGS   extra arguments for slaconv.quality.train_dit / .train_classifier / .table
#   SMOKE=1                     tiny CPU-sized run of everything (what the tests do)
#
# Writes OUTDIR/{dit,classifier,quality}/ and copies the headline files flat into OUTDIR/summary/
# (results.md, results.json, samples.png, train_samples.png, loss_curve.png, train_summary.json,
# classifier.json, run_all.log). Runs on any CUDA machine after `source benchmarks/gpu_setup.sh`.
set -euo pipefail

OUT=${1:?usage: run_all.sh OUTDIR [all|train|classifier|table]}
WHAT=${2:-all}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-python3}
SMOKE_FLAG=()
[[ "${SMOKE:-0}" == 1 ]] && SMOKE_FLAG=(--smoke)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/run_all.log"

# The scripts run against the installed package: install this checkout (editable, no dependencies) if needed.
if ! "$PY" -c "import slaconv" 2>/dev/null; then
  echo "[setup] installing slaconv (editable, no dependencies) from $REPO" | tee -a "$LOG"
  (cd "$REPO" && "$PY" -m pip install -q --no-deps -e .)
fi
"$PY" -c "import torch, diffusers, slaconv, slaconv.kernels; print('[setup] torch', torch.__version__, '| diffusers', diffusers.__version__, '| cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee -a "$LOG"

run_step() {  # name, command...
  local name=$1; shift
  echo "[$name] $*" | tee -a "$LOG"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  echo "[$name] done in $((SECONDS - t0)) s" | tee -a "$LOG"
}

if [[ "$WHAT" == all || "$WHAT" == train ]]; then
  # shellcheck disable=SC2086
  run_step train "$PY" -m slaconv.quality.train_dit --out "$OUT/dit" "${SMOKE_FLAG[@]}" ${TRAIN_ARGS:-}
fi
if [[ "$WHAT" == all || "$WHAT" == classifier ]]; then
  # With a trained DiT at hand, the judge also scores its samples (classifier.json: summary.dit_samples).
  SCORE=()
  [[ -f "${MODEL:-$OUT/dit/model}/config.json" ]] && SCORE=(--score-model "${MODEL:-$OUT/dit/model}")
  # shellcheck disable=SC2086
  run_step classifier "$PY" -m slaconv.quality.train_classifier --out "$OUT/classifier" "${SMOKE_FLAG[@]}" "${SCORE[@]}" ${CLF_ARGS:-}
fi
if [[ "$WHAT" == all || "$WHAT" == table ]]; then
  # shellcheck disable=SC2086
  run_step table "$PY" -m slaconv.quality.table --model "${MODEL:-$OUT/dit/model}" \
    --classifier "${CLASSIFIER:-$OUT/classifier}" --out "$OUT/quality" "${SMOKE_FLAG[@]}" ${TABLE_ARGS:-}
fi

mkdir -p "$OUT/summary"
for pair in quality/results.md:results.md quality/results.json:results.json quality/samples.png:samples.png \
            dit/samples.png:train_samples.png dit/loss_curve.png:loss_curve.png \
            dit/train_summary.json:train_summary.json classifier/classifier.json:classifier.json; do
  src=${pair%%:*}; dst=${pair##*:}
  [[ -f "$OUT/$src" ]] && cp "$OUT/$src" "$OUT/summary/$dst"
done
cp "$LOG" "$OUT/summary/run_all.log"
echo "[done] headline files in $OUT/summary" | tee -a "$LOG"
