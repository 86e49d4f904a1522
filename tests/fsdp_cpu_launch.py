"""Run the slaconv CLI with accelerate's FSDP on CPU processes (tests only; start it with
``accelerate launch --config_file benchmarks/accelerate_fsdp.yaml tests/fsdp_cpu_launch.py ...``).

accelerate turns ``ACCELERATE_USE_FSDP`` into ``DistributedType.FSDP`` only for GPU-class process
groups (``AcceleratorState.__init__``, accelerate 1.15); CPU processes quietly get DDP.  torch's
FSDP itself runs on CPU over gloo, so this flips that one decision: the model is then wrapped,
sharded, checkpointed and gathered by the same accelerate and torch code as on GPUs.  It also sets
accelerate's device to plain ``cpu`` (``ACCELERATE_TORCH_DEVICE``): accelerate's CPU processes use
``cpu:0``, which FSDP rejects as ``device_id`` ("Inconsistent compute device").
"""

from __future__ import annotations

import os
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
_original_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if os.environ.get("ACCELERATE_USE_FSDP") != "true":
        raise RuntimeError("fsdp_cpu_launch.py: start it with an FSDP accelerate config")
    if self.distributed_type == DistributedType.MULTI_CPU:  # the first Accelerator of the process
        if fsdp_plugin is None:
            raise RuntimeError("fsdp_cpu_launch.py: slaconv passed no FSDP plugin to Accelerator")
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # later states copy it


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    from slaconv.cli import main

    sys.exit(main())
