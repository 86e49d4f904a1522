"""SLA checkpoints in diffusers layout (FastVideo / community proj_l keys) as a starting point."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import slaconv
from helpers import make_wan, run, write_recipe
from slaconv.install import set_mode


@pytest.mark.parametrize("marker", ["attn_impl", "attn_op.local_attn"])
def test_sla_checkpoint_converts_with_proj_l_dropped(tmp_path, marker):
    original = make_wan(seed=3)
    src = tmp_path / "sla"
    original.save_pretrained(src)
    weights = src / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        state[f"blocks.{i}.attn1.{marker}.proj_l.weight"] = torch.randn(24, 24, generator=g)
        state[f"blocks.{i}.attn1.{marker}.proj_l.bias"] = torch.randn(24, generator=g)
    state["patch_embedding.weight"] = state["patch_embedding.weight"].reshape(48, -1)  # Linear-shaped export
    save_file(state, str(weights))

    out = json.loads(run("convert", src, "-o", tmp_path / "w", "--recipe", write_recipe(tmp_path / "r.yaml"),
                         "--json").stdout)
    info = out["base_model"]["sla_checkpoint"]
    assert info["proj_l_layers"] == 2 and info["patch_embedding_reshaped"] is True
    model = slaconv.from_pretrained(tmp_path / "w")
    set_mode(model, "dense")
    x = dict(hidden_states=torch.randn(1, 4, 2, 16, 16, generator=g), timestep=torch.tensor([100.0]),
             encoder_hidden_states=torch.randn(1, 6, 16, generator=g), return_dict=False)
    with torch.no_grad():
        assert torch.allclose(model(**x)[0], original(**x)[0], atol=1e-6)


def test_turbodiffusion_original_layout_is_refused_clearly(tmp_path):
    src = tmp_path / "turbo"
    make_wan().save_pretrained(src)
    weights = src / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["blocks.0.self_attn.attn_op.local_attn.proj_l.weight"] = torch.zeros(24, 24)
    save_file(state, str(weights))
    res = run("convert", src, "-o", tmp_path / "w", code=3)
    assert "TurboDiffusion" in res.stderr
