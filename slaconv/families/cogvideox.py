"""CogVideoX (``CogVideoXTransformer3DModel``): SLA2 on the joint attention of every block (``attn1``).

Each block attends over one sequence, text tokens first (226 of them, not a whole number of blocks), then
video tokens.  The processor reproduces diffusers' ``CogVideoXAttnProcessor2_0`` and its fused variant
(LayerNorm QK-norm per head, RoPE on the video tokens only where the model uses it) and replaces the
attention call with joint SLA2 (:meth:`SLA2Processor.attend_joint`).

CogVideoX is a v-prediction DDPM model, while calibration and validation speak flow matching.
:func:`_make_inputs` turns a flow-matching sample into the model's own parameterisation at the same
signal-to-noise ratio, and :func:`_read_output` turns its v-prediction back into the flow velocity, so
nothing else needs to know.
"""

from __future__ import annotations

import functools

import torch

from ..errors import InputError
from ..processor import RotaryCallSignature, SLA2Processor
from . import Family, heads_of_inner_dim, register

OFS = 2.0
"""The ``ofs`` conditioning diffusers' ``CogVideoXImageToVideoPipeline`` passes to a model that embeds it
(``ofs_embed_dim`` set; ``CogVideoXPipeline``'s text-to-video models do not embed it)."""


class SLA2CogVideoXAttnProcessor(RotaryCallSignature, SLA2Processor):
    """SLA2 processor for the joint ``Attention`` of a CogVideoX block (separate or fused QKV)."""

    def forward(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        import torch.nn.functional as F
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError(f"{self.layer_name or 'SLA2 processor'}: SLA2 does not take an attention mask")
        text_tokens = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch = hidden_states.shape[0]
        if getattr(attn, "fused_projections", False):
            qkv = attn.to_qkv(hidden_states)
            query, key, value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:  # in place on the video rows, as the stock processor does
            query[:, :, text_tokens:] = apply_rotary_emb(query[:, :, text_tokens:], image_rotary_emb)
            key[:, :, text_tokens:] = apply_rotary_emb(key[:, :, text_tokens:], image_rotary_emb)
        if self.runs_stock_attention:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        else:
            out = self.attend_joint(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                    text_tokens=text_tokens, text_first=True).transpose(1, 2)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, out = out.split([text_tokens, out.size(1) - text_tokens], dim=1)
        return out, encoder_out


def _latent_channels(config) -> int:
    if config["in_channels"] != config["out_channels"]:
        raise InputError("CogVideoX image-to-video conditions on image latents, which calibration data does not "
                         "hold; only text-to-video CogVideoX is supported")
    return config["in_channels"]


def _snr_shift(config) -> float:
    """The SNR shift (``snr_shift_scale``) of the published ``CogVideoXDDIMScheduler`` configs that
    ``CogVideoXPipeline`` runs with: 3.0 for CogVideoX-2B (the one checkpoint without RoPE, and the scheduler's
    default), 1.0 for the 5B models."""
    return 1.0 if config.get("use_rotary_positional_embeddings") else 3.0


@functools.lru_cache(maxsize=2)
def _alphas_cumprod(shift: float) -> torch.Tensor:
    """alpha_bar of the model's training noise schedule, built by diffusers' ``CogVideoXDDIMScheduler`` as the
    published configs set it: scaled-linear betas 0.00085 to 0.012 (the scheduler's defaults), SNR ``shift``,
    zero terminal SNR, v-prediction (which :func:`_read_output` inverts as the scheduler's ``step`` does)."""
    from diffusers import CogVideoXDDIMScheduler

    scheduler = CogVideoXDDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       snr_shift_scale=shift)
    return scheduler.alphas_cumprod.double()


def _ddpm_level(model, latents: torch.Tensor, timestep: torch.Tensor):
    """For flow-matching latents x = (1 - s) x0 + s noise at s = ``timestep`` / 1000 (B,): the same sample at
    unit norm, a x0 + b noise with a^2 + b^2 = 1 (same SNR), the coefficients (a, b) and the model's timestep
    t at which its schedule has alpha_bar = a^2 (interpolated between the integer steps; step 0 for noise
    below the schedule's first step)."""
    s = (timestep.double() / 1000).clamp(0, 1)
    norm = torch.sqrt((1 - s) ** 2 + s**2)
    a, b = (1 - s) / norm, s / norm
    rising = _alphas_cumprod(_snr_shift(model.config)).to(s.device).flip(0)  # alpha_bar from t = 999 down to t = 0
    pos = torch.searchsorted(rising, a**2).clamp(1, len(rising) - 1)
    lo, hi = rising[pos - 1], rising[pos]
    t = (len(rising) - 1) - (pos - 1 + ((a**2 - lo) / (hi - lo)).clamp(0, 1))
    return latents / _view(norm, latents), _view(a, latents), _view(b, latents), t


def _view(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def _rotary_embedding(model, frames: int, height: int, width: int, device):
    """The video tokens' RoPE as CogVideoXPipeline builds it, for latents of frames x height x width."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    cfg = model.config
    p, p_t = cfg.patch_size, cfg.patch_size_t
    grid_h, grid_w = height // p, width // p
    base_w, base_h = cfg.sample_width // p, cfg.sample_height // p
    if p_t is None:  # CogVideoX 1.0: the grid resized into the training resolution, centred
        if grid_h / grid_w > base_h / base_w:
            size_h, size_w = base_h, int(round(base_h / grid_h * grid_w))
        else:
            size_h, size_w = int(round(base_w / grid_w * grid_h)), base_w
        top, left = int(round((base_h - size_h) / 2.0)), int(round((base_w - size_w) / 2.0))
        return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim,
                                       crops_coords=((top, left), (top + size_h, left + size_w)),
                                       grid_size=(grid_h, grid_w), temporal_size=frames, device=device)
    return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=(grid_h, grid_w),
                                   temporal_size=-(-frames // p_t), grid_type="slice", max_size=(base_h, base_w),
                                   device=device)


def _make_inputs(model, latents, timestep, prompt_embeds) -> dict:
    x, _, _, t = _ddpm_level(model, latents, timestep)
    _, _, frames, height, width = latents.shape
    kwargs = {
        "hidden_states": x.permute(0, 2, 1, 3, 4),  # the model takes (B, F, C, H, W)
        "encoder_hidden_states": prompt_embeds,
        "timestep": t.to(torch.float32),  # CogVideoXPipeline passes the scheduler's step index t as is
        "return_dict": False,
    }
    if model.config.use_rotary_positional_embeddings:
        kwargs["image_rotary_emb"] = _rotary_embedding(model, frames, height, width, latents.device)
    if model.config.ofs_embed_dim:
        kwargs["ofs"] = torch.full((latents.shape[0],), OFS, device=latents.device, dtype=latents.dtype)
    return kwargs


def _read_output(model, output: torch.Tensor, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """v = a noise - b x0 on the input x = a x0 + b noise gives x0 = a x - b v and noise = b x + a v, so the
    flow velocity noise - x0 is (b - a) x + (a + b) v."""
    x, a, b, _ = _ddpm_level(model, latents, timestep)
    v = output.permute(0, 2, 1, 3, 4)
    return (b - a) * x + (a + b) * v


COGVIDEOX = register(
    Family(
        name="cogvideox",
        class_names=("CogVideoXTransformer3DModel",),
        default_targets=(r"re:transformer_blocks\.\d+\.attn1",),
        processor=SLA2CogVideoXAttnProcessor,
        stock_processor_path="diffusers.models.attention_processor.CogVideoXAttnProcessor2_0",
        head_shape=heads_of_inner_dim,
        make_inputs=_make_inputs,
        latent_channels=_latent_channels,
        text_dim=lambda cfg: cfg["text_embed_dim"],
        patch_size=lambda cfg: (cfg.get("patch_size_t") or 1, cfg["patch_size"], cfg["patch_size"]),
        pipeline=lambda cfg: ("CogVideoXPipeline", "text-to-video"),
        read_output=_read_output,
    )
)
