#!/usr/bin/env bash
# Source this on the GPU machine (torch 2.11 + triton 3.6, no diffusers): installs the carried wheels
# in .whl/ (diffusers and what it lacks there) into /tmp/site and puts the repo on PYTHONPATH.
set -e
mkdir -p /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# This is the device's copy of the tree: link kernels/ where the installed package would have it.
[ -e slaconv/kernels ] || ln -s ../kernels slaconv/kernels
export PYTHONPATH=$PWD:/tmp/site:$PWD/benchmarks
python3 -c "import diffusers, click, yaml, tqdm, accelerate, safetensors, triton, torch, slaconv.kernels.sla2_triton; print('setup ok: torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
