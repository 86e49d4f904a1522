"""``slaconv.from_pretrained``: an SLA2 package (Hub repo or folder) -> diffusers model with SLA2."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import InputError
from .hubfetch import fetch_snapshot
from .utils.devices import DTYPES
from .workdir import WorkDir


def from_pretrained(id_or_dir: str | Path, *, revision: str | None = None, torch_dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", quant: str | None = None, token: str | None = None):
    """Load an SLA2 model saved by slaconv.

    Returns the diffusers transformer (e.g. ``WanTransformer3DModel``) with SLA2 processors
    installed and their router/alpha tensors loaded; it drops into the stock pipeline
    (``WanPipeline.from_pretrained(base, transformer=model)``).  Raises
    :class:`slaconv.errors.InputError` when the SLA2 tensors are missing, extra or mis-shaped.
    ``quant`` overrides the stored low-bit mode (``none``, ``int8``, ``int8-fp8``).
    """
    path = Path(id_or_dir).expanduser()
    if not WorkDir.is_workdir(path):
        if path.exists():
            raise InputError(f"{path} is not an SLA2 model folder: no {WorkDir.SLA2_CONFIG}")
        path = fetch_snapshot(str(id_or_dir), revision=revision, token=token, what="SLA2 model")
    dtype_name = "float32" if torch_dtype is None else {d: name for name, d in DTYPES.items()}.get(torch_dtype)
    if dtype_name is None:
        raise ValueError(f"unsupported torch_dtype {torch_dtype}")
    model, _, _ = WorkDir(path).load_model(dtype=dtype_name, device=device, quant=quant)
    return model
