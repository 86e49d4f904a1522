"""Device and dtype names as the CLI and recipes spell them."""

from __future__ import annotations

import gc

import torch

from ..errors import InputError, UsageError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(requested: str | torch.device) -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` are checked.

    A name this tool does not run on is a :class:`UsageError` (exit 2); a GPU that is not there an
    :class:`InputError` (exit 3).
    """
    name = str(requested)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        try:
            torch.device(name)
        except (RuntimeError, ValueError):
            raise UsageError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
        raise UsageError(f"device '{name}' is not supported (slaconv runs on auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise InputError(f"device '{name}' requested but no CUDA GPU is available")
    if index and int(index) >= torch.cuda.device_count():
        raise InputError(f"device '{name}' requested but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    return name


def release_memory(device: str) -> None:
    """Collect garbage and give cached GPU memory back (between models that do not fit together)."""
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
