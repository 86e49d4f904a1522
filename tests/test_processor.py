"""Wan specifics of the SLA2 processor: I2V, full-attention recovery, state, targets, compile.

The tests every family shares (dense mode bit-identical to stock, SLA2 mode trains alpha, the CLI chain) are
in test_families.py."""

from __future__ import annotations

import pytest
import torch

import slaconv
from helpers import make_wan
from slaconv.config import SLA2Config
from slaconv.errors import RecipeError, UnsupportedModelError
from slaconv.families import detect_family, get_family
from slaconv.install import install_sla2, resolve_targets, set_mode, sla2_processors


def _inputs(model, frames=2, height=16, width=16, text=12, image=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    kwargs = {
        "hidden_states": torch.randn(1, cfg.in_channels, frames, height, width, generator=g),
        "timestep": torch.tensor([437.0]),
        "encoder_hidden_states": torch.randn(1, text, cfg.text_dim, generator=g),
        "return_dict": False,
    }
    if image is not None:
        kwargs["encoder_hidden_states_image"] = torch.randn(1, image, cfg.image_dim, generator=g)
    return kwargs


def _install(model, **kw):
    fam = get_family("wan")
    layers = resolve_targets(model, fam, [], [])
    settings = {"topk": 0.5, "block_q": 64, "block_k": 64, "quant": "none", **kw}
    return install_sla2(model, fam, layers, SLA2Config(**settings))


def test_i2v_model_only_self_attention_is_converted():
    # Wan I2V: attn2 has add_k_proj/add_v_proj and reads image tokens ahead of 512 text tokens.
    model = make_wan(added_kv_proj_dim=48, image_dim=16)
    kwargs = _inputs(model, text=512, image=5)
    with torch.no_grad():
        stock = model(**kwargs)[0]
        procs = _install(model)
        assert sorted(procs) == ["blocks.0.attn1", "blocks.1.attn1"]
        assert all(type(b.attn2.processor).__name__ == "WanAttnProcessor" for b in model.blocks)
        set_mode(model, "dense")
        assert torch.equal(stock, model(**kwargs)[0])


def test_all_blocks_and_alpha_one_recovers_full_attention():
    model = make_wan()
    kwargs = _inputs(model, height=18, width=22)  # 198 tokens: ragged 64-blocks
    with torch.no_grad():
        stock = model(**kwargs)[0]
        for proc in _install(model, topk=1.0).values():
            proc.alpha_logit.fill_(40.0)
        ours = model(**kwargs)[0]
    assert (ours - stock).norm() / stock.norm() < 1e-5


def test_processor_parameters_are_in_state_dict_fp32():
    model = make_wan()
    _install(model)
    keys = [k for k in model.state_dict() if ".processor." in k]
    assert sorted(keys) == sorted(f"blocks.{i}.attn1.processor.{t}" for i in range(2)
                                  for t in ("router_q", "router_k", "alpha_logit"))
    proc = sla2_processors(model)["blocks.0.attn1"]
    assert proc.router_q.dtype == torch.float32 and proc.router_q.shape == (2, 24, 24)
    assert torch.equal(proc.router_q[0], torch.eye(24))


def test_hedgehog_processors_hold_feature_weights_and_run_them():
    model = make_wan()
    procs = _install(model, feature_map="hedgehog")
    keys = {k for k in model.state_dict() if ".processor.feature" in k}
    assert keys == {f"blocks.{i}.attn1.processor.feature_{t}" for i in range(2) for t in "qk"}
    proc = procs["blocks.0.attn1"]
    assert set(proc.sla2_state()) == {"router_q", "router_k", "alpha_logit", "feature_q", "feature_k"}
    assert proc.feature_q.dtype == torch.float32 and proc.feature_q.shape == (2, 24, 12)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 256, 2, 24, generator=g) for _ in range(3))
    out = proc.sparse_attention(q, k, v)
    with torch.no_grad():
        proc.feature_k.copy_(torch.randn(2, 24, 12, generator=g))
    assert not torch.allclose(proc.sparse_attention(q, k, v), out, atol=1e-4)  # the weights are used
    with pytest.raises(RuntimeError, match="cannot run this call"):  # head dim 24: not one the kernels take
        proc.sparse_attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="feature map"):
        proc.config = proc.config.replace(feature_map="softmax")
    assert _install(make_wan())["blocks.0.attn1"].feature_q is None


def test_targets_and_ignore_patterns():
    model = make_wan()
    fam = get_family("wan")
    assert resolve_targets(model, fam, [], ["blocks.1.attn1"]) == ["blocks.0.attn1"]
    assert resolve_targets(model, fam, ["re:blocks\\.1\\.attn1"], []) == ["blocks.1.attn1"]
    with pytest.raises(RecipeError, match="matches no attention module"):
        resolve_targets(model, fam, ["blocks.7.attn1"], [])


def test_cross_attention_target_is_refused():
    model = make_wan()
    fam = get_family("wan")
    with pytest.raises(Exception, match="self-attention"):
        install_sla2(model, fam, ["blocks.0.attn2"], SLA2Config(topk=0.5, block_q=64, block_k=64, quant="none"))


def test_sla2_converts_an_in_memory_model_and_dense_mode_is_stock():
    """The Python entry point on a model that never touched the disk: every self-attention layer gets a
    processor with the config's settings (per-layer top-k included), an identity router and alpha at
    alpha_init; dense mode reproduces stock diffusers bit for bit, SLA2 mode changes the output."""
    model = make_wan()
    kwargs = _inputs(model, height=18, width=22)
    config = slaconv.SLA2Config(topk=0.25, block_q=64, block_k=64, quant="none",
                                topk_per_layer={"blocks.1.attn1": 0.5})
    with torch.no_grad():
        stock = model(**kwargs)[0]
        procs = slaconv.sla2_(model, config, alpha_init=0.8)
        assert list(procs) == ["blocks.0.attn1", "blocks.1.attn1"] and procs == sla2_processors(model)
        assert [p.topk for p in procs.values()] == [0.25, 0.5]
        for proc in procs.values():
            assert proc.config is config and (proc.block_q, proc.block_k, proc.quant) == (64, 64, "none")
            assert torch.equal(proc.router_q, torch.eye(24).expand(2, 24, 24))
            assert torch.allclose(torch.sigmoid(proc.alpha_logit), torch.full((2,), 0.8))
        sparse = model(**kwargs)[0]
        set_mode(model, "dense")
        dense = model(**kwargs)[0]
    assert torch.equal(dense, stock)
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, stock)


def test_sla2_targets_ignore_family_and_bad_arguments():
    model = make_wan()
    assert list(slaconv.sla2_(model, targets=["re:blocks\\.1\\..*"], ignore=["blocks.1.attn2"], family="wan")) == [
        "blocks.1.attn1"]
    assert list(slaconv.sla2_(make_wan(), ignore=["blocks.0.attn1"])) == ["blocks.1.attn1"]
    with pytest.raises(RecipeError, match="matches no attention module"):
        slaconv.sla2_(make_wan(), targets=["blocks.9.attn1"])
    with pytest.raises(ValueError, match="alpha_init"):
        slaconv.sla2_(make_wan(), alpha_init=1.0)
    with pytest.raises(ValueError, match="quant must be one of"):
        slaconv.SLA2Config(quant="fp4")


def test_family_detection():
    assert detect_family({"_class_name": "WanTransformer3DModel"}).name == "wan"
    with pytest.raises(UnsupportedModelError, match="UNet2DConditionModel"):
        detect_family({"_class_name": "UNet2DConditionModel"})


def test_compiled_blocks_share_one_graph_across_layers():
    """torch.compile of the repeated blocks must not specialise on the layer: one graph serves every SLA2
    layer (a per-layer guard would recompile each block and hit the recompile limit on real models)."""
    import torch._dynamo

    model = make_wan(num_layers=4)
    _install(model)
    torch._dynamo.reset()
    ref = model(**_inputs(model))[0]
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
        out = model(**_inputs(model))[0]
    torch._dynamo.reset()
    torch.testing.assert_close(out, ref)
