"""One process, DDP or FSDP through accelerate: the accelerator, whole-model state, cross-process
means and peak GPU memory.  Functions marked as collectives must be called by every rank."""

from __future__ import annotations

import os

import torch

from ..errors import InputError, UsageError


def reset_peak_memory() -> None:
    """Start a stage's peak-memory count afresh."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory(accelerator) -> dict:
    """Peak GPU memory allocated by this stage: the largest over the processes and each process's own.

    A collective when there are several processes: every rank must call it."""
    if not torch.cuda.is_available():
        return {}
    mine = torch.cuda.max_memory_allocated() / 2**30
    peaks = [mine]
    if accelerator.num_processes > 1:
        peaks = accelerator.gather(torch.tensor([mine], device=accelerator.device)).tolist()
    return {"peak_gpu_memory_gb": round(max(peaks), 2), "peak_gpu_memory_gb_per_rank": [round(x, 2) for x in peaks]}


def fsdp_plugin():
    """The FSDP settings ``accelerate launch --config_file`` put in the environment, or None without FSDP.

    The mixed-precision policy is pinned to fp32: the bf16 compute comes from autocast, as with one
    process or DDP.  accelerate's default bf16 policy would also cast the RoPE tables, the timestep
    input and the modules diffusers keeps in fp32, so an FSDP run would not compute what a
    one-process run computes.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(mixed_precision_policy="fp32")
    if plugin.fsdp_version == 1 and not plugin.use_orig_params:
        raise UsageError("FSDP (version 1) needs 'fsdp_use_orig_params: true' in the accelerate config: stage 2 "
                         "freezes the router but trains alpha and the weights of the same block")
    return plugin


def make_accelerator(device, grad_accum: int = 1):
    """The accelerate ``Accelerator`` of this launch: bf16 autocast on GPU, FSDP if configured."""
    from accelerate import Accelerator

    return Accelerator(gradient_accumulation_steps=grad_accum,
                       mixed_precision="bf16" if torch.cuda.is_available() and str(device) != "cpu" else "no",
                       cpu=(str(device) == "cpu"), fsdp_plugin=fsdp_plugin())


def is_fsdp(accelerator) -> bool:
    """Whether the accelerator shards the model with FSDP."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _raw_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _state_options(accelerator):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # On GPUs the full state is gathered to the CPU of the main process only (cpu_offload implies
    # rank 0 only).  On CPU processes every rank gathers it: FSDP's offload of tensors that are
    # already on the CPU crashes (segfault, torch 2.13).
    return StateDictOptions(full_state_dict=True, cpu_offload=accelerator.device.type != "cpu")


def full_model_state(accelerator, model) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state keyed by parameter name, whatever wraps the model (one
    process, DDP, FSDP).  A collective: every rank calls it; on GPUs only the main process gets it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_options(accelerator))


def full_training_state(accelerator, model, optimizer) -> tuple[dict, dict]:
    """Whole model and optimizer state, keyed by parameter name, so a checkpoint does not depend on
    the process count or the sharding.  A collective, like :func:`full_model_state`."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, _raw_optimizer(optimizer), options=_state_options(accelerator))


def load_training_state(model, optimizer, model_state: dict, optim_state: dict) -> None:
    """Load a full checkpoint (every rank reads it) into the prepared model and optimizer; FSDP
    keeps each rank's shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if any(isinstance(key, int) for key in optim_state.get("state", {})):
        raise InputError("this stage-2 checkpoint was written by an older slaconv (optimizer state by position, "
                         "not by parameter name); run the stage again without --resume")
    set_state_dict(model, _raw_optimizer(optimizer), model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))


def mean_over_processes(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the processes (a collective when there are several)."""
    if accelerator.num_processes == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))
