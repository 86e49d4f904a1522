#!/usr/bin/env bash
# Source this on a CUDA machine before the GPU scripts: installs this checkout (editable, no dependencies)
# against the machine's own torch and triton. Wheels of anything the machine lacks (diffusers, accelerate,
# click, ...) may be put in .whl/ first; they are installed offline before the package.
set -e
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir .whl/*.whl
fi
python3 -m pip install -q --no-deps --no-build-isolation -e .
python3 -c "import diffusers, click, yaml, tqdm, accelerate, safetensors, triton, torch, slaconv.kernels.sla2_triton; print('setup ok: torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
