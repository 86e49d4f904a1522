#!/usr/bin/env bash
# The Gluon sparse launch on one Hopper GPU (about 5 minutes on an H100): its GPU tests, then the sparse loop
# alone (plain / warp-specialized / Gluon, with the yardsticks) at (1, 12, 32760, 128), 97% and 90%, then the
# whole-op forward at 97% with the default and the Gluon launch against cuDNN and Flash SDPA.  A failing step
# does not stop the ones after it.  Six files go to $OUT/gluon (default ./bench_out/gluon):
#   check.log        everything printed, in order          pytest.log      the GPU tests' summary
#   sparse_loop.md   sparse-loop table (.json beside it)    attention_default.md / attention_gluon.md
#
#   bash benchmarks/gpu_gluon_check.sh          # sources benchmarks/gpu_setup.sh itself
source benchmarks/gpu_setup.sh
set +e
export PYTHONUNBUFFERED=1
set -o pipefail
DIR=${OUT:-bench_out}/gluon
mkdir -p "$DIR"
TMP=$(mktemp -d)
{
  nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
  timeout 240 python3 -m pytest -q tests/test_kernels.py -k "gluon" -p no:cacheprovider 2>&1 | tee "$DIR/pytest.log" | tail -40
  timeout 200 python3 benchmarks/bench_sparse_loop.py --topk 0.03 0.1 --reps 30 --out "$TMP/loop"
  cp "$TMP"/loop/sparse_loop.md "$TMP"/loop/sparse_loop.json "$DIR"/
  for launch in default gluon; do
    config=$([ "$launch" = gluon ] && echo '{"sparse_gluon": 1}' || echo '')
    timeout 100 python3 benchmarks/bench_attention.py --quick --topk 0.03 --rep 50 --config "$config" --out "$TMP/$launch"
    cp "$TMP/$launch/bench_attention.md" "$DIR/attention_$launch.md"
  done
} 2>&1 | tee "$DIR/check.log"
ls -la "$DIR"
