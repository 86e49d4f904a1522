"""The work directory: a plain diffusers model folder plus SLA2 state.

Layout (DESIGN.md section 4)::

    config.json, diffusion_pytorch_model*.safetensors   plain diffusers weights (dense-loadable)
    sla2.safetensors                                    "<layer>.router_q|router_k|alpha_logit", fp32
    sla2_config.json                                    format, settings, layers, provenance, summaries
    recipe.yaml                                         the resolved recipe
    reports/, checkpoints/, logs/                       written by validate / calibrate

The SLA2 tensors live in a sidecar file rather than inside the diffusers shards, so plain
``from_pretrained`` loads the folder without even an "unexpected keys" warning, and the SLA2 state
can be checked (missing / extra / mis-shaped) on its own.  Writes go to a temporary sibling
folder that is renamed into place, so a killed run never leaves a half-written work dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import InputError, OutputExistsError
from .families import Family, detect_family
from .install import install_sla2, sla2_processors, stock_processors

FORMAT_NAME = "slaconv-sla2"
FORMAT_VERSION = 1
CONFIG_NAME = "sla2_config.json"
STATE_NAME = "sla2.safetensors"
RECIPE_NAME = "recipe.yaml"
# Machine-local facts (absolute paths) that must not be published with the model; push skips it.
LOCAL_NAME = "local.json"
SLA2_TENSORS = ("router_q", "router_k", "alpha_logit")


def is_workdir(path: Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def check_output_dir(out: Path, overwrite: bool) -> None:
    """An output dir may be new, empty, or (with ``overwrite``) an earlier slaconv work dir."""
    out = Path(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a directory")
    if not is_workdir(out):
        raise OutputExistsError(f"output directory {out} already holds files that are not a slaconv work dir")
    if not overwrite:
        raise OutputExistsError(f"output directory {out} already holds a work dir (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success it replaces ``final`` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the final dir gets normal permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and rename (readers never see a partial file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def read_local(folder: Path) -> dict:
    path = Path(folder) / LOCAL_NAME
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def sla2_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{"<layer>.<tensor>": fp32 tensor}`` for every installed SLA2 processor."""
    state = {}
    for name, proc in sla2_processors(model).items():
        for key, tensor in proc.sla2_state().items():
            state[f"{name}.{key}"] = tensor.detach().float().cpu().contiguous()
    return state


def save_model_files(model: torch.nn.Module, family: Family, folder: Path) -> None:
    """Plain diffusers weights + ``sla2.safetensors`` into ``folder``."""
    with stock_processors(model, family):
        model.save_pretrained(folder, safe_serialization=True)
    save_file(sla2_state_dict(model), str(Path(folder) / STATE_NAME), metadata={"format": FORMAT_NAME})


def read_sla2_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise InputError(f"{folder} is not an SLA2 model: no {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path} is not valid JSON") from None
    if config.get("format") != FORMAT_NAME:
        raise InputError(f"{path}: format is {config.get('format')!r}, expected {FORMAT_NAME!r}")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(f"{path}: format version {config['format_version']} is newer than this slaconv ({FORMAT_VERSION})")
    for key in ("layers", "block_q", "block_k", "topk", "quant"):
        if key not in config:
            raise InputError(f"{path}: missing key '{key}'")
    return config


def load_sla2_state(folder: Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / STATE_NAME
    if not path.is_file():
        raise InputError(f"{folder}: no {STATE_NAME} (SLA2 tensors)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable safetensors file: {exc}") from None


def apply_sla2_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str = "SLA2 state") -> None:
    """Copy SLA2 tensors into installed processors; missing, extra or mis-shaped keys are errors."""
    procs = sla2_processors(model)
    expected = {f"{n}.{t}": getattr(p, t) for n, p in procs.items() for t in SLA2_TENSORS}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        raise InputError(f"{where}: missing SLA2 tensors, e.g. {missing[0]} ({len(missing)} missing)")
    if extra:
        raise InputError(f"{where}: unexpected SLA2 tensors, e.g. {extra[0]} ({len(extra)} extra)")
    for key, param in expected.items():
        if tuple(state[key].shape) != tuple(param.shape):
            raise InputError(f"{where}: {key} has shape {tuple(state[key].shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(state[key].to(param.dtype))


def install_from_config(model: torch.nn.Module, family: Family, config: dict) -> None:
    """Install processors exactly as ``sla2_config.json`` describes."""
    modules = dict(model.named_modules())
    unknown = [name for name in config["layers"] if name not in modules]
    if unknown:
        raise InputError(f"sla2_config.json names layer '{unknown[0]}' that this model does not have")
    install_sla2(model, family, list(config["layers"]), topk=config["topk"], block_q=config["block_q"],
                 block_k=config["block_k"], quant=config["quant"], topk_per_layer=config.get("topk_per_layer"))


def load_workdir(folder: Path, *, dtype: str = "float32", device: str | torch.device = "cpu",
                 quant: str | None = None):
    """(model with SLA2 installed and loaded, family, sla2 config) from a work dir or package."""
    from .source import ModelSource, load_model

    folder = Path(folder)
    config = read_sla2_config(folder)
    try:
        model_config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise InputError(f"{folder}: missing or invalid config.json") from None
    family = detect_family(model_config, config.get("family", "auto"))
    model = load_model(ModelSource(folder, str(folder), None, None, model_config), family, dtype=dtype, device=device)
    install_from_config(model, family, config)
    apply_sla2_state(model, load_sla2_state(folder), where=str(folder / STATE_NAME))
    if quant is not None:
        for proc in sla2_processors(model).values():
            proc.quant = quant
    return model, family, config


def new_sla2_config(*, family: Family, layers: list[str], recipe: dict, recipe_hash: str, base: dict) -> dict:
    s = recipe["sla2"]
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "slaconv_version": __version__,
        "family": family.name,
        "base_model": base,
        "block_q": s["block_q"],
        "block_k": s["block_k"],
        "topk": s["topk"],
        "topk_per_layer": dict(s["topk_per_layer"]),
        "feature_map": "softmax",
        "quant": s["quant"],
        "alpha_granularity": "head",
        "router": {"projections": "per-head d x d, no bias", "init": "identity"},
        "layers": layers,
        "recipe_hash": recipe_hash,
        "calibration": None,
        "validation": None,
    }
