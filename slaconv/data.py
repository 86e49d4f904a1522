"""Calibration data: the ``--data DIR`` format, its loader and its writer (synthetic data:
:mod:`slaconv.synthetic_data`).

A dataset is a directory holding ``dataset.json`` and one ``.safetensors`` file per sample::

    dataset.json               {"format": "slaconv-data", "version": 1, "num_samples": N,
                                "latent_shape": [C, F, H, W], "text_shape": [S, D],
                                ["image_shape": [S_img, D_img],] ["pooled_shape": [P],]
                                ["prompt_mask_shape": [S],] "dtype": "float32",
                                "samples": ["sample_00000.safetensors", ...],
                                "source": "synthetic" | "prepare" | ..., "seed": ...}
    sample_00000.safetensors   latents (C, F, H, W), prompt_embeds (S, D) [, image_embeds (S_img, D_img)]
                               [, pooled_embeds (P,)] [, prompt_mask (S,)]

``pooled_embeds`` is a pooled text embedding (Flux and HunyuanVideo take CLIP's); ``prompt_mask`` marks the
real text tokens with 1 and padding with 0 (HunyuanVideo and LTX-Video attend only to real tokens).

Every sample has the manifest's shapes and dtype, so samples stack into a batch without padding.
Only JSON and safetensors are ever read (never pickles).  :class:`CalibrationDataset` checks every
file's header up front, so a bad dataset fails before any model is loaded, with a one-line
:class:`~slaconv.errors.InputError` that names the offending file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from .errors import InputError, OutputExistsError, UsageError
from .utils.devices import DTYPES
from .utils.files import atomic_dir, write_json
from .utils.messages import first_line

FORMAT = "slaconv-data"
VERSION = 1
MANIFEST = "dataset.json"
# Bump when the synthetic generator's output changes, so an old directory is not mistaken for a new one.
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors header names
# tensor name -> (manifest shape key, rank); the optional ones only when the manifest has their shape
_KEYS = {
    "latents": ("latent_shape", 4),
    "prompt_embeds": ("text_shape", 2),
    "image_embeds": ("image_shape", 2),
    "pooled_embeds": ("pooled_shape", 1),
    "prompt_mask": ("prompt_mask_shape", 1),
}
_OPTIONAL = ("image_embeds", "pooled_embeds", "prompt_mask")
_REQUIRED_MANIFEST = ("format", "version", "num_samples", "latent_shape", "text_shape", "dtype", "samples")


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise UsageError(f"dataset dtype must be one of {', '.join(DTYPES)}, got {dtype}")


def _is_shape(value: Any, rank: int) -> bool:
    return (isinstance(value, list) and len(value) == rank
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))


# --------------------------------------------------------------------------------------- reading


def _read_manifest(root: Path) -> dict:
    """Load and check ``dataset.json``; every problem is an :class:`InputError` naming the file."""
    if not root.exists():
        raise InputError(f"data directory not found: {root}")
    if not root.is_dir():
        raise InputError(f"data path is not a directory: {root}")
    path = root / MANIFEST
    if not path.is_file():
        raise InputError(f"{path}: manifest not found ({root} is not a slaconv dataset; "
                         "build one with `slaconv prepare` or slaconv.data.write_synthetic_dataset)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read manifest ({first_line(exc)})") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: manifest must be a JSON object")
    if manifest.get("format") != FORMAT:
        raise InputError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in _REQUIRED_MANIFEST if k not in manifest]
    if missing:
        raise InputError(f"{path}: manifest is missing key(s) {', '.join(missing)}")
    if manifest["version"] != VERSION:
        raise InputError(f"{path}: unsupported dataset version {manifest['version']!r} (this slaconv reads {VERSION})")
    n = manifest["num_samples"]
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise InputError(f"{path}: num_samples must be a positive integer, got {n!r}")
    for shape_key, rank in _KEYS.values():
        if manifest.get(shape_key) is not None and not _is_shape(manifest[shape_key], rank):
            raise InputError(f"{path}: {shape_key} must be a list of {rank} positive integers, "
                             f"got {manifest[shape_key]!r}")
    if not isinstance(manifest["dtype"], str) or manifest["dtype"] not in DTYPES:
        raise InputError(f"{path}: dtype must be one of {', '.join(DTYPES)}, got {manifest['dtype']!r}")
    samples = manifest["samples"]
    if not (isinstance(samples, list) and all(isinstance(s, str) for s in samples)):
        raise InputError(f"{path}: samples must be a list of file names")
    if len(samples) != n:
        raise InputError(f"{path}: num_samples is {n} but {len(samples)} sample file(s) are listed")
    if len(set(samples)) != len(samples):
        raise InputError(f"{path}: samples lists a file more than once")
    for name in samples:
        # Plain names only: nothing outside the directory, nothing but safetensors (never a pickle).
        if name != Path(name).name or name.startswith(".") or "\\" in name or not name.endswith(".safetensors"):
            raise InputError(f"{path}: sample {name!r} must be a plain '*.safetensors' file name in {root}")
    return manifest


def _check_sample(path: Path, manifest: dict) -> str | None:
    """Check one sample's header against the manifest; return a one-line problem or None."""
    if not path.is_file():
        return f"{path}: sample file listed in {MANIFEST} is missing"
    try:
        with safe_open(str(path), framework="pt") as f:
            headers = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as exc:  # SafetensorError (truncated, corrupt, not safetensors) or OSError
        return f"{path}: not a readable safetensors file ({first_line(exc)})"
    for key, (shape_key, rank) in _KEYS.items():
        expected = manifest.get(shape_key)
        if key in _OPTIONAL and expected is None:
            if key in headers:
                return f"{path}: has {key} but {MANIFEST} has no {shape_key}"
            continue
        if key not in headers:
            return f"{path}: missing tensor '{key}' (has: {', '.join(sorted(headers)) or 'none'})"
        shape, st_dtype = headers[key]
        if len(shape) != rank:
            return f"{path}: '{key}' must have rank {rank}, got shape {list(shape)}"
        if list(shape) != expected:
            return f"{path}: '{key}' has shape {list(shape)} but {MANIFEST} says {shape_key} {expected}"
        dtype = _ST_DTYPES.get(st_dtype)
        if dtype is None:
            return f"{path}: '{key}' has dtype {st_dtype}; expected float32, bfloat16 or float16"
        if dtype != manifest["dtype"]:
            return f"{path}: '{key}' is {dtype} but {MANIFEST} says dtype {manifest['dtype']}"
    return None


class CalibrationDataset(Dataset):
    """A validated ``--data`` directory; items are dicts of tensors.

    Construction reads the manifest and every sample's safetensors *header* (no tensor data) and
    raises :class:`InputError` on the first problem (with a count of any others).  ``expected_channels``
    and ``expected_text_dim`` are the model's ``in_channels`` and text width, when known.
    Items: ``{"latents": (C, F, H, W), "prompt_embeds": (S, D)}`` and the optional tensors the manifest lists.
    """

    def __init__(self, root: str | os.PathLike, *, expected_channels: int | None = None,
                 expected_text_dim: int | None = None):
        self.root = Path(root)
        self.manifest = _read_manifest(self.root)
        where = self.root / MANIFEST
        channels, text_dim = self.latent_shape[0], self.text_shape[1]
        if expected_channels is not None and channels != expected_channels:
            raise InputError(f"{where}: latents have {channels} channels but the model takes "
                             f"{expected_channels} (in_channels); was the data prepared for another model?")
        if expected_text_dim is not None and text_dim != expected_text_dim:
            raise InputError(f"{where}: prompt_embeds have width {text_dim} but the model takes "
                             f"{expected_text_dim} (text_dim); was the data prepared with another text encoder?")
        self.files = [self.root / name for name in self.manifest["samples"]]
        problems = [p for p in (_check_sample(f, self.manifest) for f in self.files) if p]
        if problems:
            more = f" (and {len(problems) - 1} more bad sample(s))" if len(problems) > 1 else ""
            raise InputError(problems[0] + more)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(C, F, H, W) of every sample."""
        return tuple(self.manifest["latent_shape"])

    @property
    def text_shape(self) -> tuple[int, ...]:
        """(S, D) of every sample's prompt embeddings."""
        return tuple(self.manifest["text_shape"])

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        """(S_img, D_img) of the image embeddings, or None for text-only data."""
        shape = self.manifest.get("image_shape")
        return tuple(shape) if shape is not None else None

    @property
    def dtype(self) -> torch.dtype:
        """The stored dtype (every tensor of every sample)."""
        return DTYPES[self.manifest["dtype"]]

    def keys(self) -> tuple[str, ...]:
        """The tensor names each item holds."""
        return ("latents", "prompt_embeds") + tuple(k for k in _OPTIONAL if self.manifest.get(_KEYS[k][0]))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path = self.files[index]
        try:
            with safe_open(str(path), framework="pt") as f:
                item = {k: f.get_tensor(k) for k in self.keys()}
        except Exception as exc:  # changed on disk since the up-front check
            raise InputError(f"{path}: cannot read sample ({first_line(exc)})") from None
        for key, tensor in item.items():
            if not torch.isfinite(tensor).all():
                raise InputError(f"{path}: '{key}' contains NaN or inf")
        return item


def collate(batch: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack dataset items: latents (B, C, F, H, W), prompt_embeds (B, S, D)[, image_embeds]."""
    if not batch:
        raise ValueError("collate needs at least one item")
    keys = list(batch[0])
    if any(list(item) != keys for item in batch):
        raise ValueError("collate: items hold different tensors")
    return {k: torch.stack([item[k] for item in batch]) for k in keys}


def dataset_summary(root: str | os.PathLike) -> dict[str, Any]:
    """Validate a dataset and describe it (for ``inspect`` and ``--json`` output)."""
    ds = CalibrationDataset(root)
    m = ds.manifest
    return {
        "path": str(ds.root),
        "format": m["format"],
        "version": m["version"],
        "num_samples": len(ds),
        "latent_shape": list(ds.latent_shape),
        "text_shape": list(ds.text_shape),
        "image_shape": list(ds.image_shape) if ds.image_shape else None,
        "dtype": m["dtype"],
        "source": m.get("source"),
        "seed": m.get("seed"),
        "total_bytes": sum(f.stat().st_size for f in ds.files),
    }


# --------------------------------------------------------------------------------------- writing


def _is_dataset_with(root: Path, manifest: dict) -> bool:
    try:
        existing = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return existing == manifest


def write_samples(out: Path, manifest: dict, samples: Iterable[Mapping[str, torch.Tensor]]) -> Path:
    """Write samples + manifest into a temporary folder beside ``out``, then rename it to ``out``
    (``manifest`` from :func:`new_manifest`, one sample per name in its ``samples``)."""
    with atomic_dir(out) as tmp:
        for name, sample in zip(manifest["samples"], samples, strict=True):
            tensors = {k: v.detach().contiguous().cpu() for k, v in sample.items()}
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        write_json(tmp / MANIFEST, manifest)
    return out


def holds_dataset(out: Path, manifest: dict | None) -> bool:
    """True if ``out`` already holds this exact dataset; raise if it holds anything else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory")
    if not any(out.iterdir()):
        return False
    if manifest is not None and _is_dataset_with(out, manifest):
        try:
            CalibrationDataset(out)
        except InputError as exc:
            raise OutputExistsError(f"{out} holds this dataset but it is damaged ({exc}); remove it and rerun") from None
        return True
    raise OutputExistsError(f"{out} already exists and is not empty (and is not the same dataset); "
                            "choose another directory or remove it")


def write_dataset(out_dir: str | os.PathLike, samples: list[Mapping[str, torch.Tensor]], *,
                  source: str, seed: int | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write prepared samples (dicts with latents/prompt_embeds[/image_embeds]) as a dataset.

    All samples must share shapes and dtype.  ``out_dir`` must not exist or be empty
    (:class:`OutputExistsError` otherwise); the write is atomic.  ``extra`` adds manifest fields.
    """
    out = Path(out_dir)
    if not samples:
        raise ValueError("write_dataset needs at least one sample")
    first = samples[0]
    if set(first) - set(_KEYS) or not {"latents", "prompt_embeds"} <= set(first):
        raise ValueError(f"samples must hold latents, prompt_embeds and optionally {', '.join(_OPTIONAL)}; "
                         f"got {sorted(first)}")
    for i, s in enumerate(samples):
        if set(s) != set(first) or any(s[k].shape != first[k].shape or s[k].dtype != first[k].dtype for k in first):
            raise ValueError(f"sample {i} differs in keys, shapes or dtype from sample 0")
    manifest = new_manifest(len(samples), first, source=source, seed=seed, extra=extra)
    holds_dataset(out, None)
    return write_samples(out, manifest, samples)


def new_manifest(n: int, shapes: Mapping[str, Any], *, source: str, seed: int | None,
                 extra: Mapping[str, Any] | None = None) -> dict:
    """The ``dataset.json`` of ``n`` samples shaped like ``shapes`` (tensors by sample key)."""
    manifest: dict[str, Any] = {"format": FORMAT, "version": VERSION, "num_samples": n}
    for key, (shape_key, _) in _KEYS.items():
        if key in shapes:
            manifest[shape_key] = [int(x) for x in shapes[key].shape]
    manifest["dtype"] = _dtype_name(shapes["latents"].dtype)
    manifest["samples"] = [f"sample_{i:05d}.safetensors" for i in range(n)]
    manifest["source"] = source
    manifest["seed"] = seed
    manifest.update(extra or {})
    return manifest
