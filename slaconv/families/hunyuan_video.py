"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): SLA2 on the joint attention of every double- and
single-stream block.

Both block kinds attend over one sequence, video tokens first, then text tokens padded to a fixed length;
an attention mask hides the padding from every query.  The processor reproduces diffusers'
``HunyuanVideoAttnProcessor2_0`` Q/K/V path (per-head RMS QK-norm, RoPE on the video tokens only, the text
stream's own projections and norms in the double-stream blocks) and replaces the attention call with joint
SLA2, which cuts each sample to its real text tokens (:meth:`SLA2Processor.attend_joint`).  The per-sample
counts come from the model's ``encoder_attention_mask`` (``Family.forward_context``), read once per forward.
The token refiner's attention (text only) stays dense.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..processor import JointText, RotaryCallSignature, SLA2Processor
from . import DOUBLE_AND_SINGLE_STREAM, Family, heads_of_inner_dim, register

GUIDANCE_SCALE = 6.0
"""``HunyuanVideoPipeline``'s default ``guidance_scale``, the embedded guidance of the guidance-distilled model;
the pipeline passes it times 1000 as ``guidance``, as :func:`_make_inputs` does."""


def _rotate_video(x: torch.Tensor, rotary_emb, text_tokens: int, apply_rotary_emb) -> torch.Tensor:
    # Same arithmetic as the stock processor: RoPE on the video part of the joint sequence, text unchanged.
    return torch.cat([apply_rotary_emb(x[:, :-text_tokens], rotary_emb, sequence_dim=1), x[:, -text_tokens:]], dim=1)


def _projections(attn, x: torch.Tensor, linears, norms):
    """Q, K, V (B, N, H, D) of ``x`` through the three ``linears``, Q and K through ``norms`` where present."""
    query, key, value = (linear(x).unflatten(2, (attn.heads, -1)) for linear in linears)
    norm_q, norm_k = norms
    return (query if norm_q is None else norm_q(query)), (key if norm_k is None else norm_k(key)), value


class SLA2HunyuanVideoAttnProcessor(RotaryCallSignature, SLA2Processor):
    """SLA2 processor for the joint ``Attention`` of a HunyuanVideo double- or single-stream block."""

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        if encoder_hidden_states is None:
            raise ValueError(f"{self.layer_name or 'SLA2 processor'}: HunyuanVideo joint attention needs the text")
        single_stream = attn.add_q_proj is None
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = _projections(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v),
                                         (attn.norm_q, attn.norm_k))
        text_tokens = encoder_hidden_states.shape[1]
        if image_rotary_emb is not None:
            if single_stream:
                query = _rotate_video(query, image_rotary_emb, text_tokens, apply_rotary_emb)
                key = _rotate_video(key, image_rotary_emb, text_tokens, apply_rotary_emb)
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if not single_stream:
            encoder_query, encoder_key, encoder_value = _projections(
                attn, encoder_hidden_states, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                (attn.norm_added_q, attn.norm_added_k))
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)
        if self.runs_stock_attention:
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend, parallel_config=self._parallel_config)
        else:
            out = self.attend_joint(query, key, value, text_tokens=text_tokens, text_first=False,
                                    text_valid=self._text_valid(attention_mask, text_tokens))
        out = out.flatten(2, 3).to(query.dtype)
        out, encoder_out = out[:, :-text_tokens], out[:, -text_tokens:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_out = attn.to_add_out(encoder_out)
        return out, encoder_out

    def _text_valid(self, attention_mask, text_tokens: int) -> tuple[int, ...] | None:
        """Real text tokens per sample: told by the model's forward; read from the mask (a host read) when the
        block is called on its own."""
        if attention_mask is None:
            return None
        if self.joint_text is not None and self.joint_text.tokens == text_tokens:
            return self.joint_text.valid
        keys = attention_mask.reshape(attention_mask.shape[0], -1)
        return tuple(int(n) - (keys.shape[1] - text_tokens) for n in keys.sum(dim=1).tolist())


def _latent_channels(config) -> int:
    if config.get("image_condition_type"):
        raise InputError(f"HunyuanVideo image-to-video ({config['image_condition_type']}) conditions on image latents, "
                         "which calibration data does not hold; only text-to-video HunyuanVideo is supported")
    return config["in_channels"]


def _make_inputs(model, latents, timestep, prompt_embeds, pooled_embeds=None, prompt_mask=None) -> dict:
    if pooled_embeds is None:
        raise InputError("HunyuanVideo is conditioned on a pooled text embedding: the data needs pooled_embeds "
                         f"({model.config.pooled_projection_dim} wide)")
    b = latents.shape[0]
    if prompt_mask is None:
        prompt_mask = torch.ones(prompt_embeds.shape[:2], device=latents.device)
    kwargs = {
        "hidden_states": latents,
        "timestep": timestep,
        "encoder_hidden_states": prompt_embeds,
        "encoder_attention_mask": prompt_mask.to(torch.long),
        "pooled_projections": pooled_embeds,
        "return_dict": False,
    }
    if model.config.guidance_embeds:
        kwargs["guidance"] = torch.full((b,), GUIDANCE_SCALE * 1000.0, device=latents.device)
    return kwargs


def _forward_context(args: dict) -> JointText:
    text = args["encoder_hidden_states"].shape[1]
    mask = args.get("encoder_attention_mask")
    valid = None if mask is None else tuple(int(n) for n in mask.sum(dim=1).tolist())
    return JointText(tokens=text, valid=valid)


HUNYUAN_VIDEO = register(
    Family(
        name="hunyuan_video",
        class_names=("HunyuanVideoTransformer3DModel",),
        default_targets=DOUBLE_AND_SINGLE_STREAM,
        processor=SLA2HunyuanVideoAttnProcessor,
        stock_processor_path="diffusers.models.transformers.transformer_hunyuan_video.HunyuanVideoAttnProcessor2_0",
        head_shape=heads_of_inner_dim,
        make_inputs=_make_inputs,
        latent_channels=_latent_channels,
        text_dim=lambda cfg: cfg["text_embed_dim"],
        patch_size=lambda cfg: (cfg["patch_size_t"], cfg["patch_size"], cfg["patch_size"]),
        pipeline=lambda cfg: ("HunyuanVideoPipeline", "text-to-video"),
        pooled_dim=lambda cfg: cfg["pooled_projection_dim"],
        text_mask=True,
        forward_context=_forward_context,
    )
)
