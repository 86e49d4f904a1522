#!/usr/bin/env bash
# Hedgehog features, alpha per query (from the tail mass or from the query) and the linear branch over every key
# block on the Gluon sparse loop, on one
# Hopper GPU, at most 9 minutes: the GPU tests of the Gluon epilogue's options against the plain launch (ragged N
# and (1, 12, 32760, 128), both layouts, "none" and "int8-fp8", 90% and 97%), then
# benchmarks/bench_linear_options.py at 97% twice in the same run:
# with the default launch (every option on the Gluon loop) and with sparse_gluon=0 (every row on the plain Triton
# loop), each beside cuDNN SDPA.
# Files in $OUT/gluon_options (default ./bench_out/gluon_options): check.log, pytest.log,
# options_default.md, options_plain.md (each with its .json).
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
  timeout 200 python3 -m pytest -v tests/test_kernels.py tests/test_query_block_mixing.py \
    -k "gluon_linear_options or default_launch or query_linear or query_features or triton" \
    -p no:cacheprovider 2>&1 | tee "$DIR/pytest.log" | grep -v "^  " | tail -30
  for launch in default plain; do
    config=$([ "$launch" = plain ] && echo '{"sparse_gluon": 0}' || echo '')
    timeout 150 python3 benchmarks/bench_linear_options.py --topk 0.03 --rep 30 --no-check --config "$config" \
      --out "$TMP/$launch"
    cp "$TMP/$launch/bench_linear_options.md" "$DIR/options_$launch.md"
    cp "$TMP/$launch/bench_linear_options.json" "$DIR/options_$launch.json"
  done
} 2>&1 | tee "$DIR/check.log"
ls -la "$DIR"
