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

TESTERS: dict[str, FamilyTester] = {t.family: t for t in (WAN,)}
