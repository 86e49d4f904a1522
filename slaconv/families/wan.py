"""Wan2.1 / Wan2.2 (``WanTransformer3DModel``): SLA2 on the self-attention layers (``attn1``).

The processor reproduces diffusers' ``WanAttnProcessor`` Q/K/V path (fused or separate
projections, RMS QK-norm across heads, interleaved RoPE) and replaces only the attention call.
Cross-attention (``attn2``, text and I2V image keys) keeps the stock processor.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..processor import SLA2Processor
from . import Family, heads_of_inner_dim, register


def _apply_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Same arithmetic, in the same order, as diffusers' WanAttnProcessor.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class SLA2WanAttnProcessor(SLA2Processor):
    """SLA2 processor for a ``WanAttention`` self-attention module."""

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if encoder_hidden_states is not None or attn.is_cross_attention:
            raise ValueError(f"{self.layer_name or 'SLA2 processor'}: SLA2 applies to self-attention only")
        if attention_mask is not None:
            raise ValueError(f"{self.layer_name or 'SLA2 processor'}: SLA2 does not take an attention mask")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary(query, *rotary_emb)
            key = _apply_rotary(key, *rotary_emb)
        out = self.attend(query, key, value).flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _self_attention_only(attn, layer_name: str) -> None:
    if getattr(attn, "is_cross_attention", False):
        raise InputError("SLA2 targets must be self-attention modules (attn1), not cross-attention")


def _reorder_tokens(model, order) -> list:
    """Hooks that run a ``WanTransformer3DModel``'s blocks on tokens in ``order`` (:mod:`slaconv.token_order`):
    the patch embedding's output, the rotary embedding and a per-token timestep (Wan2.2 TI2V) enter in tile
    order, and the output projection's tokens return to raster order before the model unpatchifies them."""
    p_t, p_h, p_w = model.config.patch_size

    def set_grid(module, args, kwargs):
        latents = args[0] if args else kwargs["hidden_states"]
        _, _, frames, height, width = latents.shape
        order.set_grid((frames // p_t, height // p_h, width // p_w), latents.device)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if isinstance(timestep, torch.Tensor) and timestep.ndim == 2:  # one timestep per token
            if len(args) > 1:
                args = (args[0], order.to_tiles(timestep, 1), *args[2:])
            else:
                kwargs = {**kwargs, "timestep": order.to_tiles(timestep, 1)}
        return args, kwargs

    def patches_to_tiles(module, args, out):
        # (B, C, F, H, W) -> (B, C, N, 1, 1): the model's flatten(2) then gives the tokens in tile order
        return order.to_tiles(out.flatten(2), 2)[..., None, None]

    def rotary_to_tiles(module, args, out):
        return tuple(order.to_tiles(freqs, 1) for freqs in out)  # (1, N, 1, D) cos and sin

    def output_to_raster(module, args, out):
        return order.to_raster(out, 1)  # (B, N, C) before the unpatchify

    return [model.register_forward_pre_hook(set_grid, with_kwargs=True),
            model.patch_embedding.register_forward_hook(patches_to_tiles),
            model.rope.register_forward_hook(rotary_to_tiles),
            model.proj_out.register_forward_hook(output_to_raster)]


def _make_inputs(model, latents, timestep, prompt_embeds, image_embeds=None) -> dict:
    kwargs = {
        "hidden_states": latents,
        "timestep": timestep,
        "encoder_hidden_states": prompt_embeds,
        "return_dict": False,
    }
    if image_embeds is not None:
        kwargs["encoder_hidden_states_image"] = image_embeds
    return kwargs


WAN = register(
    Family(
        name="wan",
        class_names=("WanTransformer3DModel",),
        default_targets=(r"re:blocks\.\d+\.attn1",),
        processor=SLA2WanAttnProcessor,
        stock_processor_path="diffusers.models.transformers.transformer_wan.WanAttnProcessor",
        head_shape=heads_of_inner_dim,
        make_inputs=_make_inputs,
        latent_channels=lambda cfg: cfg["in_channels"],
        text_dim=lambda cfg: cfg["text_dim"],
        patch_size=lambda cfg: tuple(cfg["patch_size"]),
        # Image-to-video checkpoints carry an image-embedding projection.
        pipeline=lambda cfg: (("WanImageToVideoPipeline", "image-to-video") if cfg.get("image_dim")
                              else ("WanPipeline", "text-to-video")),
        check_target=_self_attention_only,
        reorder_tokens=_reorder_tokens,
    )
)
