#!/usr/bin/env bash
# One short device call: kernel tests on the GPU and the 97% attention rows (correctness + timing of the
# current kernels), then train the quality benchmark's original DiT and its classifier.  At most 8 files
# come back under $OUT: gpu.log, the model (2 files), samples.png, loss_curve.png, train_summary.json and
# the classifier (2 files).
#   MINUTES=5 bash benchmarks/gpu_final_check.sh
source benchmarks/gpu_setup.sh
set +e
export PYTHONUNBUFFERED=1
L=$OUT/gpu.log
timeout 80 python3 -m pytest -q -x tests/test_kernels.py 2>&1 | tail -4 | tee -a "$L"
timeout 60 python3 benchmarks/bench_attention.py --quick --no-check --topk 0.03 --out /tmp/ba 2>&1 | grep "^|" | tee -a "$L"
O=/tmp/q5
TRAIN_ARGS="--max-minutes ${MINUTES:-5}" timeout 420 benchmarks/quality/run_all.sh $O train 2>&1 | tail -25 >> "$L"
echo "train rc=$?" >> "$L"
cp $O/dit/model/* $O/dit/samples.png $O/dit/loss_curve.png $O/dit/train_summary.json "$OUT"/
timeout 110 benchmarks/quality/run_all.sh $O classifier 2>&1 | tail -8 >> "$L"
echo "classifier rc=$?" >> "$L"
mkdir -p "$OUT/classifier" && cp $O/classifier/classifier.safetensors $O/classifier/classifier.json "$OUT/classifier/"
ls -la "$OUT" >> "$L"
tail -45 "$L"
