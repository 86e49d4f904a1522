"""Synthetic calibration data: deterministic structured latents and text embeddings, written in the
:mod:`slaconv.data` format, for data-free calibration and validation."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import holds_dataset, new_manifest, write_samples
from .errors import UsageError
from .utils.devices import DTYPES

SYNTHETIC_GENERATOR = "slaconv.data.synthetic/1"
"""The manifest's ``generator``: names the sampling below (kept as first written, so datasets compare equal)."""


def _sample_seed(seed: int, index: int) -> int:
    # Sample i depends only on (seed, i): growing num_samples keeps earlier samples unchanged.
    return int.from_bytes(hashlib.sha256(f"slaconv-synthetic:{seed}:{index}".encode()).digest()[:8], "little") >> 1


def _smooth_field(gen: torch.Generator, c: int, f: int, h: int, w: int) -> torch.Tensor:
    """Unit-variance field per channel: coarse noise upsampled (structure) + a little fine noise."""
    coarse = torch.randn(1, c, f // 4 + 2, h // 8 + 2, w // 8 + 2, generator=gen)
    smooth = F.interpolate(coarse, size=(f, h, w), mode="trilinear", align_corners=True)[0]
    x = smooth + 0.25 * torch.randn(c, f, h, w, generator=gen)
    x = x + 0.5 * torch.randn(c, 1, 1, 1, generator=gen)  # per-channel offsets, as real VAE latents have
    return (x - x.mean()) / x.std()


def synthetic_sample(seed: int, index: int, *, channels: int, frames: int, height: int, width: int,
                     text_len: int, text_dim: int, image_len: int = 0, image_dim: int = 0, pooled_dim: int = 0,
                     prompt_mask: bool = False, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Sample ``index`` of the synthetic dataset ``seed`` (deterministic, CPU).

    Latents: smooth random fields with spatial/temporal structure, zero mean, unit variance.
    prompt_embeds: a random number of unit-variance token vectors sharing a per-prompt component,
    then zero padding to ``text_len`` (as diffusers' Wan pipeline pads T5 outputs); ``prompt_mask`` marks
    those tokens.  pooled_embeds (``pooled_dim`` > 0): one unit-variance vector.
    """
    gen = torch.Generator().manual_seed(_sample_seed(seed, index))
    latents = _smooth_field(gen, channels, frames, height, width)
    n_tok = int(torch.randint(min(8, text_len), text_len + 1, (1,), generator=gen))
    base = torch.randn(1, text_dim, generator=gen)
    text = torch.zeros(text_len, text_dim)
    text[:n_tok] = (0.6 * base + 0.8 * torch.randn(n_tok, text_dim, generator=gen))
    out = {"latents": latents, "prompt_embeds": text}
    if image_len:
        out["image_embeds"] = torch.randn(image_len, image_dim, generator=gen)
    if pooled_dim:
        out["pooled_embeds"] = torch.randn(pooled_dim, generator=gen)
    if prompt_mask:
        out["prompt_mask"] = (torch.arange(text_len) < n_tok).float()
    return {k: v.to(dtype) for k, v in out.items()}


def write_synthetic_dataset(out_dir: str | os.PathLike, *, num_samples: int, channels: int, frames: int,
                            height: int, width: int, text_len: int, text_dim: int, seed: int = 0,
                            dtype: torch.dtype | str = torch.float32, image_len: int = 0, image_dim: int = 0,
                            pooled_dim: int = 0, prompt_mask: bool = False) -> Path:
    """Write a deterministic synthetic dataset (see :func:`synthetic_sample`) to ``out_dir``.

    Same arguments give byte-identical files.  Written atomically (temp dir beside ``out_dir``, then
    rename).  If ``out_dir`` already holds exactly this dataset it is left as is and returned;
    any other non-empty ``out_dir`` raises :class:`OutputExistsError`.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UsageError(f"synthetic data: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    dims = dict(num_samples=num_samples, channels=channels, frames=frames, height=height, width=width,
                text_len=text_len, text_dim=text_dim)
    for name, v in dims.items():
        if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise UsageError(f"synthetic data: {name} must be a positive integer, got {v!r}")
    if (image_len > 0) != (image_dim > 0):
        raise UsageError("synthetic data: image_len and image_dim must both be positive or both 0")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UsageError(f"synthetic data: seed must be an integer, got {seed!r}")
    kwargs = dict(channels=channels, frames=frames, height=height, width=width, text_len=text_len,
                  text_dim=text_dim, image_len=image_len, image_dim=image_dim, pooled_dim=pooled_dim,
                  prompt_mask=prompt_mask, dtype=dtype)
    shapes = {"latents": torch.empty(channels, frames, height, width, dtype=dtype),
              "prompt_embeds": torch.empty(text_len, text_dim)}
    if image_len:
        shapes["image_embeds"] = torch.empty(image_len, image_dim)
    if pooled_dim:
        shapes["pooled_embeds"] = torch.empty(pooled_dim)
    if prompt_mask:
        shapes["prompt_mask"] = torch.empty(text_len)
    manifest = new_manifest(num_samples, shapes, source="synthetic", seed=seed,
                         extra={"generator": SYNTHETIC_GENERATOR})
    out = Path(out_dir)
    if holds_dataset(out, manifest):
        return out
    samples = (synthetic_sample(seed, i, **kwargs) for i in range(num_samples))
    return write_samples(out, manifest, samples)
