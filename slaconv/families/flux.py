"""Flux (``FluxTransformer2DModel``): SLA2 on the joint attention of every double- and single-stream block.

Both block kinds attend over one sequence, text tokens first, then image tokens.  The processor reproduces
diffusers' ``FluxAttnProcessor`` Q/K/V path (separate or fused projections, per-head RMS QK-norm, the text
stream's own projections and norms in the double-stream blocks, RoPE over the joint sequence) and replaces
the attention call with joint SLA2 (:meth:`SLA2Processor.attend_joint`).  A single-stream block's processor
sees only the joint sequence; its text length comes from the model's forward (``Family.forward_context``).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..processor import JointText, SLA2Processor
from . import DOUBLE_AND_SINGLE_STREAM, Family, heads_of_head_dim, register
from .packing import pack, unpack

GUIDANCE_SCALE = 3.5
"""``FluxPipeline``'s default ``guidance_scale``, which it passes unscaled as ``guidance`` to a model with
``guidance_embeds`` (FLUX.1-dev is guidance-distilled)."""


class SLA2FluxAttnProcessor(SLA2Processor):
    """SLA2 processor for a ``FluxAttention`` module (double- or single-stream block)."""

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if attention_mask is not None:
            raise ValueError(f"{self.layer_name or 'SLA2 processor'}: SLA2 does not take an attention mask")
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
            text_tokens = encoder_hidden_states.shape[1]
        elif self.joint_text is not None:
            text_tokens = self.joint_text.tokens
        else:
            raise ValueError(f"{self.layer_name or 'SLA2 processor'}: a single-stream block learns its text length "
                             "from the model's forward; call the model, not the block")
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if self.runs_stock_attention:
            out = dispatch_attention_fn(query, key, value, attn_mask=None, backend=self._attention_backend,
                                        parallel_config=self._parallel_config)
        else:
            out = self.attend_joint(query, key, value, text_tokens=text_tokens, text_first=True)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        encoder_out, out = out.split_with_sizes([text_tokens, out.shape[1] - text_tokens], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(encoder_out.contiguous())


def _latent_channels(config) -> int:
    out = config.get("out_channels")
    if out is not None and out != config["in_channels"]:  # Fill, Depth, Canny: image conditioning channels
        raise InputError(f"Flux with {config['in_channels']} input and {out} output channels conditions on an "
                         "image, which calibration data does not hold; only text-to-image Flux is supported")
    return config["in_channels"] // 4  # tokens pack 2 x 2 latent pixels


def _make_inputs(model, latents, timestep, prompt_embeds, pooled_embeds=None, prompt_mask=None) -> dict:
    if pooled_embeds is None:
        raise InputError("Flux is conditioned on a pooled text embedding: the data needs pooled_embeds "
                         f"({model.config.pooled_projection_dim} wide)")
    b, _, frames, height, width = latents.shape
    if frames != 1:
        raise InputError(f"Flux takes images: latents must have 1 frame, got {frames}")
    image_ids = torch.zeros(height // 2, width // 2, 3, device=latents.device)
    image_ids[..., 1] = torch.arange(height // 2, device=latents.device).view(-1, 1)
    image_ids[..., 2] = torch.arange(width // 2, device=latents.device).view(1, -1)
    kwargs = {
        "hidden_states": pack(latents, 1, 2),  # FluxPipeline._pack_latents; ids: _prepare_latent_image_ids
        "encoder_hidden_states": prompt_embeds,
        "pooled_projections": pooled_embeds,
        "timestep": timestep / 1000,  # as FluxPipeline passes it: the model scales it (and guidance) by 1000
        "img_ids": image_ids.view(-1, 3).to(latents.dtype),
        "txt_ids": torch.zeros(prompt_embeds.shape[1], 3, device=latents.device, dtype=latents.dtype),
        "return_dict": False,
    }
    if model.config.guidance_embeds:
        kwargs["guidance"] = torch.full((b,), GUIDANCE_SCALE, device=latents.device)
    return kwargs


FLUX = register(
    Family(
        name="flux",
        class_names=("FluxTransformer2DModel",),
        default_targets=DOUBLE_AND_SINGLE_STREAM,
        processor=SLA2FluxAttnProcessor,
        stock_processor_path="diffusers.models.transformers.transformer_flux.FluxAttnProcessor",
        head_shape=heads_of_head_dim,
        make_inputs=_make_inputs,
        latent_channels=_latent_channels,
        text_dim=lambda cfg: cfg["joint_attention_dim"],
        patch_size=lambda cfg: (1, 2, 2),
        pipeline=lambda cfg: ("FluxPipeline", "text-to-image"),
        read_output=lambda model, output, latents, timestep: unpack(output, latents.shape, 1, 2),
        pooled_dim=lambda cfg: cfg["pooled_projection_dim"],
        forward_context=lambda args: JointText(tokens=args["encoder_hidden_states"].shape[1]),
    )
)
