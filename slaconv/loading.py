"""``slaconv.from_pretrained`` and ``slaconv.save_pretrained``: an SLA2 package (Hub repo or folder) to and
from a diffusers model with SLA2 installed.

A diffusers model's own ``save_pretrained`` would write the SLA2 processors' tensors into the diffusers shards
under processor keys, a folder neither slaconv nor plain diffusers reads cleanly; so a model that
``from_pretrained`` loads (or :func:`slaconv.sla2_` converts) gets a ``save_pretrained`` that writes the SLA2
layout instead (:func:`save_pretrained`).
"""

from __future__ import annotations

import types
from pathlib import Path

import torch

from . import __version__
from .errors import InputError
from .hubfetch import fetch_snapshot
from .install import family_of, sla2_processors
from .utils.devices import DTYPES
from .workdir import WorkDir, WorkDirConfig

_RECORD = "_slaconv_record"
"""The attribute holding the ``sla2_config.json`` record a model was loaded with (provenance, summaries)."""


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
    model, _, config = WorkDir(path).load_model(dtype=dtype_name, device=device, quant=quant)
    setattr(model, _RECORD, config)
    bind_save_pretrained(model)
    return model


def save_pretrained(model: torch.nn.Module, save_directory: str | Path, is_main_process: bool = True) -> None:
    """Write ``model`` (a diffusers transformer with SLA2 installed) to ``save_directory`` in slaconv's layout:
    plain diffusers weights, ``sla2.safetensors`` and ``sla2_config.json``.

    A model from :func:`from_pretrained` keeps the record it was loaded with (base model, recipe hash,
    calibration and validation summaries), with the attention settings and layers its processors now have;
    one converted in memory by :func:`slaconv.sla2_` gets a record without provenance.  Both
    :func:`from_pretrained` and plain diffusers ``from_pretrained`` load the folder.  ``is_main_process``:
    as in diffusers, only the process where it is true writes."""
    procs = sla2_processors(model)
    if not procs:
        raise InputError("this model has no SLA2 layers; save it with diffusers' save_pretrained")
    if not is_main_process:
        return
    attention = next(iter(procs.values())).config
    record = getattr(model, _RECORD, None)
    family = family_of(model)
    if record is None:
        record = WorkDirConfig(attention=attention, layers=tuple(procs), family=family.name,
                               slaconv_version=__version__)
    record = record.replace(attention=attention, layers=tuple(procs))
    work = WorkDir(save_directory)
    work.path.mkdir(parents=True, exist_ok=True)
    work.save_model(model, family)
    work.write_sla2_config(record)


def bind_save_pretrained(model: torch.nn.Module) -> None:
    """Make ``model.save_pretrained(dir)`` call :func:`save_pretrained` (bound to the instance, so a deep copy
    of the model saves itself)."""
    model.save_pretrained = types.MethodType(save_pretrained, model)
