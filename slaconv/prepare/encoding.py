"""Encoding captions and videos the way diffusers' ``WanPipeline`` does.

* latents: ``vae.encode(video).latent_dist.mode()`` (the posterior mean, as Wan's own VAE ``encode``
  and diffusers' Wan I2V pipeline (``sample_mode="argmax"``) use it, so the data is deterministic),
  normalised as ``(z - latents_mean) * (1 / latents_std)``: the exact inverse of the pipeline's decode
  step ``z / (1 / latents_std) + latents_mean``.  Stored as ``latents[0]``: (C, F', H', W') with
  F' = (F - 1) / 4 + 1 and H' = H / 8 for Wan2.1's VAE.  The VAE always runs in float32.
* prompt_embeds: ``WanPipeline._get_t5_prompt_embeds``: the prompt cleaned the same way (ftfy if
  installed, HTML unescape, whitespace collapsed), tokenised with ``padding="max_length"``,
  ``truncation=True``, the encoder's last hidden state computed with the attention mask, then every
  position past the real tokens (including their ``</s>``) set to exactly zero: (max_sequence_length, D).
"""

from __future__ import annotations

import html
import re

import torch


def prompt_clean(text: str) -> str:
    """diffusers' Wan ``prompt_clean``: ftfy (if installed), HTML unescape twice, whitespace collapsed."""
    try:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean as wan_clean

        return wan_clean(text)
    except ImportError:  # pragma: no cover - the same thing, for a diffusers that moved it
        from diffusers.utils import is_ftfy_available

        if is_ftfy_available():
            import ftfy

            text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def encode_prompts(tokenizer, encoder, prompts: list[str], *, max_sequence_length: int, device,
                   dtype: torch.dtype) -> torch.Tensor:
    """(B, max_sequence_length, D), exactly ``WanPipeline._get_t5_prompt_embeds`` (zeros after the tokens)."""
    prompts = [prompt_clean(p) for p in prompts]
    inputs = tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids, mask = inputs.input_ids, inputs.attention_mask
    seq_lens = mask.gt(0).sum(dim=1).long()
    embeds = encoder(ids.to(device), mask.to(device)).last_hidden_state.to(dtype=dtype)
    embeds = [u[:v] for u, v in zip(embeds, seq_lens)]
    return torch.stack([torch.cat([u, u.new_zeros(max_sequence_length - u.size(0), u.size(1))]) for u in embeds])


@torch.no_grad()
def encode_video(vae, video: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor, *, device) -> torch.Tensor:
    """(3, F, H, W) in [-1, 1] -> normalised latents (C, F', H', W'), float32 on the CPU."""
    z = vae.encode(video.unsqueeze(0).to(device, torch.float32)).latent_dist.mode()
    z = (z - mean.to(z.device, z.dtype)) * inv_std.to(z.device, z.dtype)
    return z[0].float().cpu()
