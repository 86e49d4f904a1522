"""Shared fixtures: tiny real Wan transformers built from diffusers' own test configuration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# diffusers' tests/models/transformers/test_models_transformer_wan.py init dict, with head dim 24 so
# that both blocks of 64 tokens and RoPE's t/h/w split work.
WAN_TEST_CONFIG = {
    "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 24, "in_channels": 4,
    "out_channels": 4, "text_dim": 16, "freq_dim": 256, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32,
}


def make_wan(seed: int = 0, **overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**WAN_TEST_CONFIG, **overrides}).eval()


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory) -> Path:
    """A saved tiny Wan transformer (diffusers folder) shared by the session; never modified."""
    folder = tmp_path_factory.mktemp("tiny_wan") / "transformer"
    make_wan().save_pretrained(folder)
    return folder


def tiny_recipe_overrides(**extra) -> dict:
    """Fast settings for tests: 64-token blocks, a few steps per stage."""
    base = {
        "sla2.topk": 0.4, "sla2.block_q": 64, "sla2.block_k": 64,
        "data.frames": 2, "data.height": 18, "data.width": 22, "data.text_len": 6,  # 2*9*11 = 198 tokens
        "calibration.stage1.steps": 3, "calibration.stage2.steps": 3, "calibration.checkpoint_every": 1,
        "calibration.stage1.query_blocks_per_step": 2, "validation.num_samples": 1, "validation.sample_steps": 2,
        "validation.timesteps": [700, 200],
    }
    base.update(extra)
    return base


def dir_snapshot(folder: Path) -> dict:
    """{relative path: (size, mtime_ns, bytes hash)} to prove a folder was not modified."""
    import hashlib

    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = (p.stat().st_size, p.stat().st_mtime_ns,
                                               hashlib.sha256(p.read_bytes()).hexdigest())
    return out
