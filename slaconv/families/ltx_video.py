"""LTX-Video (``LTXVideoTransformer3DModel``): SLA2 on the self-attention layers (``attn1``).

Like Wan, LTX-Video attends to the text in a separate cross-attention (``attn2``), which stays dense.  The
processor reproduces diffusers' ``LTXVideoAttnProcessor`` Q/K/V path (RMS QK-norm across heads, RoPE on
the whole inner dim before the heads are split) and replaces only the attention call.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..processor import SLA2Processor
from . import Family, heads_of_head_dim, register
from .packing import pack, unpack

FRAME_RATE = 25
"""``LTXPipeline``'s default ``frame_rate``, which sets the temporal RoPE scale."""
VAE_COMPRESSION = (8, 32, 32)
"""The LTX-Video VAE's (temporal, height, width) compression, as ``LTXPipeline`` reads it from its VAE (and
assumes without one): the RoPE grid's scale in pixels, ``rope_interpolation_scale`` = (8 / frame rate, 32, 32)."""


class SLA2LTXVideoAttnProcessor(SLA2Processor):
    """SLA2 processor for an ``LTXAttention`` self-attention module."""

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        if encoder_hidden_states is not None:
            raise ValueError(f"{self.layer_name or 'SLA2 processor'}: SLA2 applies to self-attention only")
        if attention_mask is not None:
            raise ValueError(f"{self.layer_name or 'SLA2 processor'}: SLA2 does not take an attention mask")
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        out = self.attend(query, key, value).flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def _self_attention_only(attn, layer_name: str) -> None:
    if layer_name.rsplit(".", 1)[-1] != "attn1":  # attn2, the text cross-attention, has the same shapes
        raise InputError(f"SLA2 targets must be self-attention modules (attn1), not {layer_name}")


def _patches(config) -> tuple[int, int]:
    return config["patch_size_t"], config["patch_size"]


def _make_inputs(model, latents, timestep, prompt_embeds, prompt_mask=None) -> dict:
    patch_t, patch = _patches(model.config)
    _, _, frames, height, width = latents.shape
    if prompt_mask is None:
        prompt_mask = torch.ones(prompt_embeds.shape[:2], device=latents.device)
    t_scale, h_scale, w_scale = VAE_COMPRESSION
    return {
        "hidden_states": pack(latents, patch_t, patch),  # LTXPipeline._pack_latents
        "encoder_hidden_states": prompt_embeds,
        "timestep": timestep,  # LTXPipeline passes the scheduler's 1000 * sigma
        "encoder_attention_mask": prompt_mask,
        "num_frames": frames // patch_t,
        "height": height // patch,
        "width": width // patch,
        "rope_interpolation_scale": (t_scale / FRAME_RATE, h_scale, w_scale),
        "return_dict": False,
    }


def _read_output(model, output: torch.Tensor, latents: torch.Tensor, timestep) -> torch.Tensor:
    return unpack(output, latents.shape, *_patches(model.config))


LTX_VIDEO = register(
    Family(
        name="ltx_video",
        class_names=("LTXVideoTransformer3DModel",),
        default_targets=(r"re:transformer_blocks\.\d+\.attn1",),
        processor=SLA2LTXVideoAttnProcessor,
        stock_processor_path="diffusers.models.transformers.transformer_ltx.LTXVideoAttnProcessor",
        head_shape=heads_of_head_dim,
        make_inputs=_make_inputs,
        latent_channels=lambda cfg: cfg["in_channels"] // (cfg["patch_size_t"] * cfg["patch_size"] ** 2),
        text_dim=lambda cfg: cfg["caption_channels"],
        patch_size=lambda cfg: (cfg["patch_size_t"], cfg["patch_size"], cfg["patch_size"]),
        pipeline=lambda cfg: ("LTXPipeline", "text-to-video"),
        read_output=_read_output,
        text_mask=True,
        check_target=_self_attention_only,
    )
)
