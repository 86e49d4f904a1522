"""Resolving and checking a diffusers Wan pipeline folder; loading its VAE and text encoder.

Only three components of a diffusers Wan pipeline are read: ``vae/`` (``AutoencoderKLWan``),
``text_encoder/`` (``UMT5EncoderModel`` or ``T5EncoderModel``) and ``tokenizer/``; never the
transformer.  Weights are read from safetensors only (``use_safetensors=True``): nothing is unpickled.
A Hub id downloads just those folders plus ``model_index.json``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, UsageError
from ..utils.files import read_json
from ..utils.messages import first_line, looks_local

COMPONENTS = ("vae", "text_encoder", "tokenizer")
TEXT_ENCODER_CLASSES = ("UMT5EncoderModel", "T5EncoderModel")
_TEXT_ENCODER_BY_TYPE = {"umt5": "UMT5EncoderModel", "t5": "T5EncoderModel"}
# Hub download: configs, safetensors weights (+ shard indexes) and tokenizer files; never *.bin / *.pt.
HUB_PATTERNS = [
    "model_index.json",
    "vae/config.json", "vae/*.safetensors", "vae/*.safetensors.index.json",
    "text_encoder/config.json", "text_encoder/*.safetensors", "text_encoder/*.safetensors.index.json",
    "tokenizer/*.json", "tokenizer/*.model", "tokenizer/*.txt",
]
HUB_CONFIG_PATTERNS = ["model_index.json", "vae/config.json", "text_encoder/config.json",
                       "tokenizer/tokenizer_config.json"]


def resolve_pipeline(pipeline: str, *, revision: str | None = None, offline: bool = False,
                     configs_only: bool = False) -> tuple[Path, str | None]:
    """Local folder or Hub id -> (local pipeline folder, revision); downloads only what prepare reads."""
    if looks_local(pipeline):
        root = Path(pipeline).expanduser()
        if not root.exists():
            raise InputError(f"pipeline path does not exist: {pipeline}")
        if not root.is_dir():
            raise InputError(f"pipeline path is not a folder: {pipeline}")
        return root, None  # a local folder has no Hub revision
    from ..hubfetch import fetch_snapshot

    snapshot = fetch_snapshot(pipeline, revision=revision, offline=offline, what="pipeline",
                              allow_patterns=HUB_CONFIG_PATTERNS if configs_only else HUB_PATTERNS)
    return snapshot, snapshot.name


def check_pipeline(root: Path, *, weights: bool = True) -> dict:
    """Check the vae/, text_encoder/, tokenizer/ folders; return {"vae": cfg, "text_encoder": cfg, ...}."""
    missing = [c for c in COMPONENTS if not (root / c).is_dir()]
    if missing:
        hint = " (this looks like a single model folder, not a pipeline)" if (root / "config.json").is_file() else ""
        raise InputError(f"{root} is not a diffusers Wan pipeline folder: no {', '.join(m + '/' for m in missing)}"
                         f"{hint}")
    info: dict[str, Any] = {}
    for comp in ("vae", "text_encoder"):
        cfg_path = root / comp / "config.json"
        if not cfg_path.is_file():
            raise InputError(f"{root / comp}: no config.json")
        if weights and not any((root / comp).glob("*.safetensors")):
            raise InputError(f"{root / comp} holds no .safetensors weights (pickled checkpoints are not read)")
        info[comp] = read_json(cfg_path)
    vae = info["vae"]
    if vae.get("_class_name") != "AutoencoderKLWan":
        raise InputError(f"{root / 'vae'}: is {vae.get('_class_name')!r}, expected 'AutoencoderKLWan' (a Wan pipeline)")
    info["text_encoder_class"] = _text_encoder_class(root, info["text_encoder"])
    return info


def _text_encoder_class(root: Path, cfg: dict) -> str:
    names = list(cfg.get("architectures") or [])
    index = root / "model_index.json"
    if index.is_file():
        entry = read_json(index).get("text_encoder")
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
            names.insert(0, entry[1])
    for name in names:
        if name in TEXT_ENCODER_CLASSES:
            return name
    by_type = _TEXT_ENCODER_BY_TYPE.get(cfg.get("model_type"))
    if by_type:
        return by_type
    raise InputError(f"{root / 'text_encoder'}: expected a UMT5/T5 encoder, got "
                     f"{names or cfg.get('model_type')!r}")


def vae_factors(vae_cfg: dict) -> tuple[int, int]:
    """The VAE's (spatial, temporal) downsampling factors (8 and 4 when the config omits them)."""
    return int(vae_cfg.get("scale_factor_spatial") or 8), int(vae_cfg.get("scale_factor_temporal") or 4)


def check_sizes(vae_cfg: dict | None, *, height, width, num_frames, max_sequence_length) -> None:
    """:class:`UsageError` unless the frame size, frame count and text length suit the VAE (or Wan's defaults)."""
    spatial, temporal = vae_factors(vae_cfg or {})
    multiple = max(16, spatial)
    for name, v in (("height", height), ("width", width)):
        if not (isinstance(v, int) and v > 0 and v % multiple == 0):
            raise UsageError(f"--{name} must be a positive multiple of {multiple} (WanPipeline's rule), got {v}")
    if not (isinstance(num_frames, int) and num_frames > 0 and (num_frames - 1) % temporal == 0):
        raise UsageError(f"--num-frames must be {temporal}k+1 (1, 5, ..., 81), got {num_frames}")
    if not (isinstance(max_sequence_length, int) and max_sequence_length > 0):
        raise UsageError(f"--max-sequence-length must be a positive integer, got {max_sequence_length}")


@contextlib.contextmanager
def library_progress_bars(enabled: bool):
    """Silence transformers' / diffusers' own loading bars unless ours are on."""
    if enabled:
        yield
        return
    from diffusers.utils import logging as dlog

    libs = [dlog]
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as tlog

        libs.append(tlog)
    was = [lib.is_progress_bar_enabled() for lib in libs]
    for lib in libs:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, on in zip(libs, was):
            if on:
                lib.enable_progress_bar()


def load_text_encoder(root: Path, class_name: str, *, dtype: torch.dtype, device):
    """(tokenizer, text encoder in eval mode on ``device``) from the pipeline's safetensors weights."""
    try:
        import transformers
    except ImportError:
        raise InputError("slaconv prepare needs transformers for the text encoder: pip install transformers") from None
    cls = getattr(transformers, class_name)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(root / "tokenizer")
    except Exception as exc:
        raise InputError(f"could not load the tokenizer from {root / 'tokenizer'}: {first_line(exc)}") from None
    try:
        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        encoder = cls.from_pretrained(root / "text_encoder", use_safetensors=True, **{dtype_kw: dtype})
    except Exception as exc:
        raise InputError(f"could not load {root / 'text_encoder'} as {class_name}: {first_line(exc)}") from None
    return tokenizer, encoder.to(device).eval()


def load_vae(root: Path, *, device):
    """The pipeline's ``AutoencoderKLWan`` in float32, eval mode, on ``device`` (safetensors weights only)."""
    from diffusers import AutoencoderKLWan

    try:
        vae = AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=torch.float32, use_safetensors=True)
    except Exception as exc:
        raise InputError(f"could not load {root / 'vae'} as AutoencoderKLWan: {first_line(exc)}") from None
    return vae.to(device).eval()


def latent_stats(vae_cfg: dict, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents_mean, 1 / latents_std) from the VAE config, shaped (1, z_dim, 1, 1, 1) to broadcast."""
    z = vae_cfg.get("z_dim")
    mean, std = vae_cfg.get("latents_mean"), vae_cfg.get("latents_std")
    for name, v in (("latents_mean", mean), ("latents_std", std)):
        if not (isinstance(v, list) and len(v) == z):
            raise InputError(f"{root / 'vae' / 'config.json'}: {name} must list z_dim={z} values, "
                             f"got {len(v) if isinstance(v, list) else v!r}")
    if any(s == 0 for s in std):
        raise InputError(f"{root / 'vae' / 'config.json'}: latents_std holds a zero")
    return torch.tensor(mean).view(1, z, 1, 1, 1), 1.0 / torch.tensor(std).view(1, z, 1, 1, 1)

