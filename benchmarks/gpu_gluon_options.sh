#!/usr/bin/env bash
# Hedgehog features, alpha per query and the linear branch over every key block on the Gluon sparse loop, on one
# Hopper GPU, at most 9 minutes: the GPU tests of the Gluon epilogue's options against the plain launch (ragged N
# and (1, 12, 32760, 128), both layouts, "none" and "int8-fp8", 90% and 97%), then
# benchmarks/bench_linear_options.py at 97% twice in the same run:
# with the default launch (the options on the plain Triton loop) and with sparse_gluon=1 (every row on Gluon),
# each beside cuDNN SDPA.  If the tests pass and the Gluon rows are faster, LaunchConfig.sparse_gluon=2 can take
# the Gluon loop for the options too (the condition in sla2_triton.forward).
# Files in $OUT/gluon_options (default ./bench_out/gluon_options): check.log, pytest.log,
# options_default.md, options_gluon.md (each with its .json).
#
#   bash benchmarks/gpu_gluon_options.sh          # sources benchmarks/gpu_setup.sh itself
source benchmarks/gpu_setup.sh
set +e -o pipefail
export PYTHONUNBUFFERED=1
DIR=${OUT:-bench_out}/gluon_options
mkdir -p "$DIR"
TMP=$(mktemp -d)
{
  nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
  timeout 180 python3 -m pytest -v tests/test_kernels.py -k "gluon_linear_options or default_launch" \
    -p no:cacheprovider 2>&1 | tee "$DIR/pytest.log" | grep -v "^  " | tail -30
  for launch in default gluon; do
    config=$([ "$launch" = gluon ] && echo '{"sparse_gluon": 1}' || echo '')
    timeout 150 python3 benchmarks/bench_linear_options.py --topk 0.03 --rep 30 --no-check --config "$config" \
      --out "$TMP/$launch"
    cp "$TMP/$launch/bench_linear_options.md" "$DIR/options_$launch.md"
    cp "$TMP/$launch/bench_linear_options.json" "$DIR/options_$launch.json"
  done
} 2>&1 | tee "$DIR/check.log"
ls -la "$DIR"
