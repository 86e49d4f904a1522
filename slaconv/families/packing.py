"""Latents <-> token sequences for families whose transformer takes patch tokens (Flux, LTX-Video).

Both pack a (B, C, F, H, W) latent into (B, F/pt * H/p * W/p, C * pt * p * p) tokens in frame, row, column
order, each token's features ordered (channel, t, y, x), as their diffusers pipelines do.
"""

from __future__ import annotations

import torch

from ..errors import InputError


def pack(latents: torch.Tensor, patch_t: int, patch: int) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, tokens, C * patch_t * patch * patch)."""
    b, c, f, h, w = latents.shape
    if f % patch_t or h % patch or w % patch:
        raise InputError(f"latents {f}x{h}x{w} do not tile into {patch_t}x{patch}x{patch} patches")
    x = latents.reshape(b, c, f // patch_t, patch_t, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack(tokens: torch.Tensor, shape: torch.Size, patch_t: int, patch: int) -> torch.Tensor:
    """The inverse of :func:`pack` for latents of ``shape`` (B, C, F, H, W)."""
    b, c, f, h, w = shape
    x = tokens.reshape(b, f // patch_t, h // patch, w // patch, c, patch_t, patch, patch)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, c, f, h, w)
