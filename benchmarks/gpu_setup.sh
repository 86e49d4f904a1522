#!/usr/bin/env bash
# Source this on a CUDA machine before the GPU scripts: installs this checkout (editable, no dependencies)
# against the machine's own torch and triton. Wheels of anything the machine lacks (diffusers, accelerate,
# click, ...) may be put in .whl/ first; they are installed offline before the package.
#
# Optional: the cuDNN block-sparse yardstick of benchmarks/bench_sparse_loop.py (the `bench` extra) needs these
# wheels in .whl/, fetched for Python 3.12 on a machine with internet:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     -d .whl nvidia-cudnn-frontend==1.32.0 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
#     nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi cuda-bindings protobuf
# About 115 MB (nvidia-cutlass-dsl-libs-cu13 alone is 92 MB; the nvidia-cutlass-dsl metadata also names the CUDA 12
# build, nvidia-cutlass-dsl-libs-cu12, 92 MB more, left out here), more than the GPU machines take with a
# checkout, so the benchmark normally reports those rows as not run.
set -e
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir .whl/*.whl
fi
python3 -m pip install -q --no-deps --no-build-isolation -e .
python3 -c "import diffusers, click, yaml, tqdm, accelerate, safetensors, triton, torch, slaconv.kernels.sla2_triton; print('setup ok: torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
