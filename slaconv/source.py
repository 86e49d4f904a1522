"""Finding and loading a diffusers transformer from a local directory or a Hub repo.

Only safetensors weights are read (``use_safetensors=True``): a checkpoint that ships only
pickled ``.bin`` files is refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError, UnsupportedModelError
from .families import Family, detect_family
from .utils.devices import DTYPES
from .utils.messages import first_line, looks_local


@dataclass
class ModelSource:
    """A resolved model: the local folder holding ``config.json`` and where it came from."""

    path: Path
    revision: str | None
    subfolder: str | None
    config: dict


def resolve_model(model: str, *, subfolder: str | None = None, revision: str | None = None,
                  offline: bool = False) -> ModelSource:
    """Local path or Hub id (+subfolder, revision) -> :class:`ModelSource`, with one-line errors."""
    if looks_local(model):
        root = Path(model).expanduser()
        if not root.exists():
            raise InputError(f"model path does not exist: {model}")
        folder = root / subfolder if subfolder else root
        revision_used = None
    else:
        folder, revision_used = _download(model, subfolder=subfolder, revision=revision, offline=offline)
    config_path = folder / "config.json"
    if not config_path.is_file():
        hint = " (a pipeline folder? pass --subfolder transformer)" if (folder / "transformer").is_dir() else ""
        raise InputError(f"{folder} is not a diffusers model folder: no config.json{hint}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{config_path} is not valid JSON") from None
    if not isinstance(config, dict) or "_class_name" not in config:
        raise InputError(f"{config_path} is not a diffusers model config (no _class_name)")
    if not any(folder.glob("*.safetensors")):
        raise InputError(f"{folder} holds no .safetensors weights (pickled checkpoints are not read)")
    return ModelSource(folder, revision_used or revision, subfolder, config)


def _download(model: str, *, subfolder: str | None, revision: str | None, offline: bool) -> tuple[Path, str | None]:
    from .hubfetch import fetch_snapshot

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [f"{prefix}config.json", f"{prefix}*.safetensors", f"{prefix}*.safetensors.index.json"]
    path = fetch_snapshot(model, revision=revision, allow_patterns=patterns, offline=offline)
    return (path / subfolder if subfolder else path), path.name


def content_hash(folder: Path) -> str:
    """sha256 over the folder's config.json and safetensors files (names and bytes), streamed."""
    digest = hashlib.sha256()
    files = sorted([folder / "config.json", *folder.glob("*.safetensors")])
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


# Where public SLA checkpoints in diffusers layout keep SLA's `proj_l`, by the code that wrote them.
SLA_LAYOUTS = {  # most specific first: the TurboDiffusion marker contains the community one
    "turbodiffusion": ".self_attn.attn_op.local_attn.proj_l.",
    "fastvideo": ".attn_impl.proj_l.",
    "diffusers-community": ".attn_op.local_attn.proj_l.",
}


def _weight_keys(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    shapes[key] = tuple(fh.get_slice(key).get_shape())
        except Exception as exc:
            raise InputError(f"{f} is not a readable safetensors file: {first_line(exc)}") from None
    return shapes


def sla_checkpoint_info(folder: Path) -> dict | None:
    """If ``folder`` is an SLA (not SLA2) checkpoint in diffusers layout: which layout, how many layers.

    SLA's ``proj_l`` has no SLA2 counterpart (SLA2 mixes with alpha instead), so it is dropped; the
    rest of the SLA-tuned weights are the starting point.  A patch embedding stored Linear-shaped
    (TurboDiffusion quantised exports) is reshaped back to the Conv3d kernel.
    """
    keys = _weight_keys(folder)
    for layout, marker in SLA_LAYOUTS.items():
        hits = sorted({k.split(marker)[0] for k in keys if marker in k})
        if hits:
            if layout == "turbodiffusion":
                raise UnsupportedModelError(
                    f"{folder} is a TurboDiffusion checkpoint in Wan's original module layout; convert it to the "
                    "diffusers layout first (it stores blocks.N.self_attn..., diffusers uses blocks.N.attn1...)")
            linear_patch = len(keys.get("patch_embedding.weight", ())) == 2
            return {"layout": layout, "proj_l_layers": len(hits), "dropped": "proj_l",
                    "patch_embedding_reshaped": linear_patch}
    return None


def _load_sla_checkpoint(source: ModelSource, cls, dtype: torch.dtype) -> torch.nn.Module:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(source.path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    state = {k: v for k, v in state.items() if not any(m in k for m in SLA_LAYOUTS.values())}
    model = cls.from_config(source.config)
    patch = state.get("patch_embedding.weight")
    if patch is not None and patch.dim() == 2:
        state["patch_embedding.weight"] = patch.reshape(model.patch_embedding.weight.shape)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(f"{source.path}: weights do not match {cls.__name__}: {first_line(exc)}") from None
    if dtype != torch.float32:  # as from_pretrained(torch_dtype=...) does: some modules stay fp32
        keep = getattr(cls, "_keep_in_fp32_modules", None) or []
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and not any(k in name for k in keep):
                tensor.data = tensor.data.to(dtype)
    return model


def load_model(source: ModelSource, family: Family | None = None, *, dtype: str = "float32",
               device: str | torch.device = "cpu") -> torch.nn.Module:
    """Instantiate the diffusers model of ``source`` from its safetensors weights.

    SLA checkpoints in diffusers layout (FastVideo / community ``proj_l`` keys) load too, with
    ``proj_l`` dropped: see :func:`sla_checkpoint_info`.
    """
    family = family or detect_family(source.config)
    cls = family.load_class()
    if sla_checkpoint_info(source.path) is not None:
        return _load_sla_checkpoint(source, cls, DTYPES[dtype]).to(device).eval()
    try:
        model = cls.from_pretrained(source.path, torch_dtype=DTYPES[dtype], use_safetensors=True)
    except Exception as exc:
        raise InputError(f"could not load {source.path} as {cls.__name__}: {first_line(exc)}") from None
    return model.to(device).eval()
