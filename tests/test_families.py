"""The same tests on every model family: one tester config each, in ``family_testers.py``.

Dense mode reproduces the stock diffusers processor bit for bit (separate and fused QKV where the model has
both); SLA2 mode changes the output and trains alpha; the whole CLI runs on the CPU and the saved model loads
back to the output the work dir holds.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import slaconv
from family_testers import TESTERS
from helpers import fails, run, write_recipe
from slaconv.config import SLA2Config
from slaconv.families import get_family
from slaconv.install import set_mode, sla2_processors
from slaconv.workdir import WorkDir

SETTINGS = SLA2Config(topk=0.25, block_q=64, block_k=64, quant="none")


def _cases(with_fused: bool) -> list:
    """(tester, variant, fused) for every family, each of its variants, and fused QKV where it has them."""
    cases = []
    for tester in TESTERS.values():
        for variant in (None, *tester.variants):
            for fused in (False, True) if with_fused and tester.fusable else (False,):
                name = "-".join(x for x in (tester.family, variant, "fused" if fused else None) if x)
                cases.append(pytest.param(tester, variant, fused, id=name))
    return cases


def _forward(model, kwargs):
    return model(**kwargs)[0]


@pytest.mark.parametrize("tester,variant,fused", _cases(with_fused=True))
def test_dense_mode_is_bit_identical_to_stock(tester, variant, fused):
    model = tester.build(variant=variant)
    if fused:
        model.fuse_qkv_projections()
    kwargs = tester.inputs(model, torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = _forward(model, kwargs)
        procs = slaconv.sla2_(model, SETTINGS)
        set_mode(model, "dense")
        ours = _forward(model, kwargs)
    assert list(procs) == list(tester.layers)
    assert torch.equal(stock, ours)


@pytest.mark.parametrize("tester,variant,fused", _cases(with_fused=False))
def test_sla2_mode_changes_the_output_and_trains_alpha(tester, variant, fused):
    model = tester.build(variant=variant)
    kwargs = tester.inputs(model, torch.Generator().manual_seed(2))
    with torch.no_grad():
        stock = _forward(model, kwargs)
    procs = slaconv.sla2_(model, SETTINGS)
    out = _forward(model, kwargs)
    assert torch.isfinite(out).all()
    assert (out - stock).norm() > 1e-3 * stock.norm()
    out.square().mean().backward()
    for name, proc in procs.items():
        assert proc.alpha_logit.grad is not None and proc.alpha_logit.grad.abs().sum() > 0, name


def _expected_output(work, kwargs):
    """The saved model assembled without slaconv's loader: stock diffusers weights, then SLA2 installed with
    the work dir's settings and the tensors of sla2.safetensors copied in."""
    config = WorkDir(work).read_sla2_config()
    model = get_family(config.family).load_class().from_pretrained(work).eval()
    procs = slaconv.sla2_(model, config.attention, targets=list(config.layers))
    with torch.no_grad():
        for key, tensor in load_file(str(work / "sla2.safetensors")).items():
            layer, name = key.rsplit(".", 1)
            getattr(procs[layer], name).copy_(tensor)
        return _forward(model, kwargs)


@pytest.mark.parametrize("tester", TESTERS.values(), ids=TESTERS)
def test_cli_chain_and_the_saved_model(tester, tmp_path):
    """convert -> calibrate (both stages, data-free) -> synth-data -> validate on the CPU; from_pretrained gives the
    work dir's output."""
    source = tmp_path / "model"
    tester.build().save_pretrained(source)
    recipe = write_recipe(tmp_path / "r.yaml", **{f"data.{k}": v for k, v in tester.data.items()},
                          **{"calibration.stage1.steps": 2, "calibration.stage2.steps": 2,
                             "calibration.eval_samples": 1, "validation.timesteps": [500]})
    work = tmp_path / "work"
    out = json.loads(run("convert", source, "-o", work, "--recipe", recipe, "--json").stdout)
    assert out["family"] == tester.family and out["layers"] == list(tester.layers)
    cal = json.loads(run("calibrate", work, "--json").stdout)
    assert cal["stage1"]["steps"] == 2 and cal["stage2"]["steps"] == 2
    data = tmp_path / "data"  # validation on a data folder: pooled embeddings and text masks where the model takes them
    run("synth-data", data, "--model", work, "--num-samples", 1)
    report = json.loads(run("validate", work, "--data", data, "--json").stdout)
    assert [x["layer"] for x in report["layers"]] == list(tester.layers)
    for layer in report["layers"]:
        assert 0 < layer["sparsity"] < 1 and 0 <= layer["attention_rel_l2"] < 1
    info = json.loads(run("inspect", work, "--json").stdout)
    assert info["family"] == tester.family
    assert any(x["router_moved"] > 0 for x in info["layers"])  # stage 1 trained the router
    assert f"family {tester.family}" in run("inspect", work).stdout

    model = slaconv.from_pretrained(work)
    assert list(sla2_processors(model)) == list(tester.layers)
    kwargs = tester.inputs(model, torch.Generator().manual_seed(3))
    with torch.no_grad():
        loaded = _forward(model, kwargs)
        set_mode(model, "dense")
        dense = _forward(model, kwargs)
    assert torch.equal(loaded, _expected_output(work, kwargs))
    assert not torch.allclose(loaded, dense)


@pytest.mark.parametrize("tester", TESTERS.values(), ids=TESTERS)
def test_convert_on_a_gpu_refuses_a_head_dim_the_kernels_do_not_take(tester, tmp_path, monkeypatch):
    """One error line, exit 3, before any weight reaches the (pretended) GPU; the CPU converts the same model."""
    import diffusers

    source = tmp_path / "model"
    getattr(diffusers, tester.class_name)(**{**tester.init_dict, **tester.off_kernel}).save_pretrained(source)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    line = fails(3, "convert", source, "-o", tmp_path / "work", "--device", "cuda", match="head dim 48")
    assert tester.layers[0] in line and "64, 128" in line
    assert not (tmp_path / "work").exists()
    monkeypatch.undo()
    recipe = write_recipe(tmp_path / "r.yaml", **{f"data.{k}": v for k, v in tester.data.items()})
    run("convert", source, "-o", tmp_path / "work", "--recipe", recipe, "--device", "cpu")


@pytest.mark.parametrize("tester", TESTERS.values(), ids=TESTERS)
def test_compiled_blocks_trace_without_graph_breaks(tester):
    """compile_repeated_blocks(fullgraph=True) traces the SLA2 processors (joint ones included: the text of the
    call reaches them as plain values) and gives the eager output."""
    import torch._dynamo

    model = tester.build()
    if not model._repeated_blocks:
        pytest.skip(f"diffusers declares no repeated blocks for {tester.class_name}")
    slaconv.sla2_(model, SETTINGS)
    kwargs = tester.inputs(model, torch.Generator().manual_seed(4))
    with torch.no_grad():
        eager = _forward(model, kwargs)
        torch._dynamo.reset()
        with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
            model.compile_repeated_blocks(fullgraph=True, backend="eager")
            compiled = _forward(model, kwargs)
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager)
