"""One tester config per model family: a tiny model and its inputs, as diffusers' own model tests build them.

``tests/test_families.py`` runs the same tests on every config in :data:`TESTERS`, so supporting a new family
in the tests means adding a config here, not copying tests.  Each init dict is the one of diffusers'
``tests/models/transformers/test_models_transformer_<model>.py``; where a value differs, the comment says why
(mostly: sequences long enough to hold several 64-token blocks, and head dims RoPE can split).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class FamilyTester:
    """What the shared family tests need to know about one family."""

    family: str
    """Registered family name."""
    class_name: str
    """The diffusers model class."""
    init_dict: dict
    """Constructor arguments of the tiny model."""
    inputs: Callable[[torch.nn.Module, torch.Generator], dict]
    """``inputs(model, generator)``: forward keyword arguments in the model's own input format
    (``return_dict=False``), fresh random tensors from ``generator``."""
    layers: tuple[str, ...]
    """The self-attention layers the family converts by default in the tiny model."""
    data: dict
    """Recipe ``data.*`` for the CLI chain: latent frames, height, width and text length."""
    fusable: bool = False
    """The stock processor also runs on fused QKV projections (``fuse_qkv_projections()``)."""
    variants: dict[str, dict] = field(default_factory=dict)
    """Named init-dict overrides that change the attention path (RoPE on or off, guidance...)."""
    off_kernel: dict = field(default_factory=lambda: {"attention_head_dim": 48})
    """Init-dict overrides giving head dim 48, one the SLA2 kernels do not take (RoPE axes resized to fit)."""

    def build(self, seed: int = 0, variant: str | None = None) -> torch.nn.Module:
        """The tiny model with random weights from ``seed``, in eval mode."""
        import diffusers

        torch.manual_seed(seed)
        overrides = self.variants[variant] if variant else {}
        return getattr(diffusers, self.class_name)(**{**self.init_dict, **overrides}).eval()


def _wan_inputs(model, gen):
    cfg = model.config
    return {
        "hidden_states": torch.randn(1, cfg.in_channels, 2, 18, 22, generator=gen),  # 2*9*11 = 198 tokens
        "timestep": torch.randint(0, 1000, (1,), generator=gen).float(),
        "encoder_hidden_states": torch.randn(1, 12, cfg.text_dim, generator=gen),
        "return_dict": False,
    }


WAN = FamilyTester(
    family="wan",
    class_name="WanTransformer3DModel",
    # head dim 24 (diffusers: 12) so that RoPE's t/h/w split and 64-token blocks both work
    init_dict={"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 24, "in_channels": 4,
               "out_channels": 4, "text_dim": 16, "freq_dim": 256, "ffn_dim": 32, "num_layers": 2,
               "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32},
    inputs=_wan_inputs,
    layers=("blocks.0.attn1", "blocks.1.attn1"),
    data={"frames": 2, "height": 18, "width": 22, "text_len": 6},
    fusable=True,
)



def _cogvideox_inputs(model, gen):
    cfg = model.config
    frames, height, width = 4, 16, 16  # 4 * 8 * 8 = 256 video tokens after 8 text tokens
    kwargs = {
        "hidden_states": torch.randn(1, frames, cfg.in_channels, height, width, generator=gen),
        "encoder_hidden_states": torch.randn(1, 8, cfg.text_embed_dim, generator=gen),
        "timestep": torch.randint(0, 1000, (1,), generator=gen),
        "return_dict": False,
    }
    if cfg.use_rotary_positional_embeddings:  # built by CogVideoXPipeline's own method (sizes in pixels)
        from types import SimpleNamespace

        from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

        pipe = SimpleNamespace(transformer=model, vae_scale_factor_spatial=8)
        kwargs["image_rotary_emb"] = CogVideoXPipeline._prepare_rotary_positional_embeddings(
            pipe, height * 8, width * 8, frames, "cpu")
    return kwargs


COGVIDEOX = FamilyTester(
    family="cogvideox",
    class_name="CogVideoXTransformer3DModel",
    init_dict={"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 4,
               "time_embed_dim": 2, "text_embed_dim": 8, "num_layers": 1, "sample_width": 8, "sample_height": 8,
               "sample_frames": 8, "patch_size": 2, "temporal_compression_ratio": 4, "max_text_seq_length": 8},
    inputs=_cogvideox_inputs,
    layers=("transformer_blocks.0.attn1",),
    data={"frames": 4, "height": 16, "width": 16, "text_len": 8},
    fusable=True,
    # CogVideoX-5B: RoPE on the video tokens; head dim 16 so that RoPE's t/h/w split has even parts.
    # CogVideoX 1.5: also patches of 2 frames, RoPE on a grid sliced from the training size.
    variants={"rope": {"use_rotary_positional_embeddings": True, "attention_head_dim": 16},
              "1.5": {"use_rotary_positional_embeddings": True, "attention_head_dim": 16, "patch_size_t": 2,
                      "sample_height": 16, "sample_width": 16}},
)


def _flux_inputs(model, gen):
    cfg = model.config
    text = 64  # text first, a whole number of 64-token blocks: no reordering (the CLI chain uses 48)
    kwargs = {
        "hidden_states": torch.randn(1, 16 * 16, cfg.in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(1, text, cfg.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=gen),
        "img_ids": torch.randn(16 * 16, 3, generator=gen),
        "txt_ids": torch.randn(text, 3, generator=gen),
        "timestep": torch.rand(1, generator=gen),
        "return_dict": False,
    }
    if cfg.guidance_embeds:
        kwargs["guidance"] = torch.tensor([3.5])
    return kwargs


FLUX = FamilyTester(
    family="flux",
    class_name="FluxTransformer2DModel",
    init_dict={"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
               "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
               "axes_dims_rope": [4, 4, 8]},
    inputs=_flux_inputs,
    layers=("transformer_blocks.0.attn", "single_transformer_blocks.0.attn"),
    data={"frames": 1, "height": 32, "width": 32, "text_len": 48},  # 256 image tokens after 48 text tokens
    fusable=True,
    variants={"guidance": {"guidance_embeds": True}},  # FLUX.1-dev; the base config is FLUX.1-schnell-like
    off_kernel={"attention_head_dim": 48, "axes_dims_rope": [8, 8, 32]},
)


def _hunyuan_video_inputs(model, gen):
    cfg = model.config
    mask = torch.ones(2, 12)
    mask[1, 7:] = 0  # the second prompt has 7 real tokens and 5 of padding
    return {
        "hidden_states": torch.randn(2, cfg.in_channels, 1, 16, 16, generator=gen),  # 256 video tokens
        "timestep": torch.randint(0, 1000, (2,), generator=gen).float(),
        "encoder_hidden_states": torch.randn(2, 12, cfg.text_embed_dim, generator=gen),
        "pooled_projections": torch.randn(2, cfg.pooled_projection_dim, generator=gen),
        "encoder_attention_mask": mask,
        "guidance": torch.randint(0, 1000, (2,), generator=gen).float(),
        "return_dict": False,
    }


HUNYUAN_VIDEO = FamilyTester(
    family="hunyuan_video",
    class_name="HunyuanVideoTransformer3DModel",
    init_dict={"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 10,
               "num_layers": 1, "num_single_layers": 1, "num_refiner_layers": 1, "patch_size": 1, "patch_size_t": 1,
               "guidance_embeds": True, "text_embed_dim": 16, "pooled_projection_dim": 8, "rope_axes_dim": (2, 4, 4),
               "image_condition_type": None},
    inputs=_hunyuan_video_inputs,
    layers=("transformer_blocks.0.attn", "single_transformer_blocks.0.attn"),
    data={"frames": 1, "height": 16, "width": 16, "text_len": 12},
    off_kernel={"attention_head_dim": 48, "rope_axes_dim": (8, 20, 20)},
)


def _ltx_video_inputs(model, gen):
    cfg = model.config
    mask = torch.ones(1, 16)
    mask[0, 11:] = 0
    return {
        "hidden_states": torch.randn(1, 1 * 16 * 16, cfg.in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(1, 16, cfg.caption_channels, generator=gen),
        "timestep": torch.randint(0, 1000, (1,), generator=gen),
        "encoder_attention_mask": mask,
        "num_frames": 1,
        "height": 16,
        "width": 16,
        "return_dict": False,
    }


LTX_VIDEO = FamilyTester(
    family="ltx_video",
    class_name="LTXVideoTransformer3DModel",
    init_dict={"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8,
               "cross_attention_dim": 16, "num_layers": 1, "qk_norm": "rms_norm_across_heads", "caption_channels": 16},
    inputs=_ltx_video_inputs,
    layers=("transformer_blocks.0.attn1",),
    data={"frames": 1, "height": 16, "width": 16, "text_len": 16},
    off_kernel={"attention_head_dim": 48, "cross_attention_dim": 96},  # the text is projected to the inner dim
)

TESTERS: dict[str, FamilyTester] = {t.family: t for t in (WAN, COGVIDEOX, FLUX, HUNYUAN_VIDEO, LTX_VIDEO)}
