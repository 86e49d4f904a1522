"""The linear branch over every key block (``linear_keys: all``): the reference against an fp64 oracle written
from docs/design.md section 1, the kernels against the reference, and the setting through recipe, config, CLI,
work dir and inspect."""

from __future__ import annotations

import json
import math

import pytest
import torch

import slaconv
from helpers import run, write_recipe
from slaconv.config import SLA2Config
from slaconv.kernels import reference as R
from slaconv.recipe import Recipe, RecipeError


def random_inputs(b, h, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    wq = torch.eye(d) + 0.3 * torch.randn(h, d, d, generator=g)
    wk = torch.eye(d) + 0.3 * torch.randn(h, d, d, generator=g)
    return q, k, v, wq, wk, torch.randn(h, generator=g)


def fp64_all_keys(q, k, v, block_mask, alpha_logit, bq, bk):
    """Per row, with explicit loops: O_s over the selected keys, O_l = linear attention (phi = softmax over d)
    over *every* key, alpha = sigmoid(alpha_logit) per head; 1 for a row that selects every block."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, n, d = q.shape
    nk = math.ceil(n / bk)
    out = torch.zeros(b, h, n, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            phi_k = torch.softmax(k[bi, hi], dim=-1)
            for i in range(n):
                sel = [bool(block_mask[bi, hi, i // bq, j]) for j in range(nk)]
                keys = torch.tensor([sel[t // bk] for t in range(n)])
                s = k[bi, hi] @ q[bi, hi, i] / math.sqrt(d)
                o_s = torch.softmax(s[keys], dim=0) @ v[bi, hi][keys]
                if all(sel):
                    out[bi, hi, i] = o_s
                    continue
                kern = phi_k @ torch.softmax(q[bi, hi, i], dim=0)
                o_l = (kern @ v[bi, hi]) / (kern.sum() + R.LINEAR_EPS)
                a = torch.sigmoid(alpha_logit[hi].double())
                out[bi, hi, i] = a * o_s + (1 - a) * o_l
    return out


@pytest.mark.parametrize("n,bq,bk,topk", [(256, 64, 64, 0.25), (333, 128, 64, 0.3), (200, 64, 64, 1.0)])
def test_reference_matches_fp64(n, bq, bk, topk):
    q, k, v, wq, wk, logit = random_inputs(1, 2, n, 16, n)
    mask = R.hard_topk_mask(R.router_scores(q, k, wq, wk, bq, bk), R.topk_count(topk, math.ceil(n / bk)))
    expected = fp64_all_keys(q, k, v, mask, logit, bq, bk)
    out = R.sla2_attention_reference(q, k, v, wq, wk, logit, topk=topk, block_q=bq, block_k=bk, linear_keys="all")
    assert (out.double() - expected).norm() / expected.norm() < 1e-5
    rest = R.sla2_attention_reference(q, k, v, wq, wk, logit, topk=topk, block_q=bq, block_k=bk)
    if topk == 1.0:  # every block selected: no linear branch in either form
        assert torch.equal(out, rest)
    else:  # the selected blocks now count in the linear branch: another output
        assert (rest.double() - expected).norm() / expected.norm() > 1e-3


def test_reference_rejects_an_unknown_setting():
    q, k, v, wq, wk, logit = random_inputs(1, 2, 128, 16, 0)
    with pytest.raises(ValueError, match="linear_keys must be one of"):
        R.sla2_attention_reference(q, k, v, wq, wk, logit, topk=0.5, block_q=64, block_k=64, linear_keys="some")


@pytest.mark.parametrize("mixing", ["head", "query"])
def test_triton_and_reference_agree(mixing):
    """The op reaches the kernels' per-head linear state and gives the reference's output and gradients (fp32,
    interpreter; the kernels' own fp64 tests are in test_kernels.py)."""
    from slaconv.kernels.ops import sla2_attention

    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 320, 2, 64, generator=g) for _ in range(3))
    router = [torch.randn(2, 64, 64, generator=g) / 8 for _ in range(2)]
    alpha_logit = torch.randn(2, generator=g)
    grad_out = torch.randn(1, 320, 2, 64, generator=g)
    outs, grads = [], []
    for backend in ("reference", "triton"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, alpha_logit)]
        out = sla2_attention(*leaves[:3], *router, leaves[3], topk=0.4, block_q=64, block_k=64, mixing=mixing,
                             linear_keys="all", backend=backend)
        (out * grad_out).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in leaves])
    assert float((outs[1] - outs[0]).norm() / outs[0].norm()) < 1e-4
    for name, got, want in zip("q k v alpha_logit".split(), grads[1], grads[0]):
        assert float((got - want).norm() / want.norm()) < 1e-3, name


def test_recipe_and_config_check_the_setting():
    assert Recipe().override({"sla2.linear_keys": "all"}).sla2.attention_config().linear_keys == "all"
    assert "linear_keys" not in Recipe().dump()
    with pytest.raises(RecipeError, match="sla2.linear_keys must be one of"):
        Recipe().override({"sla2.linear_keys": "selected"})
    assert SLA2Config.from_dict({"linear_keys": "all"}).linear_keys == "all"
    assert SLA2Config.from_dict({}).linear_keys == "unselected"  # work dirs from before the setting
    assert "linear_keys" not in SLA2Config().to_dict()
    assert SLA2Config(linear_keys="all").to_dict()["linear_keys"] == "all"


def test_work_dir_converts_inspects_and_loads(tmp_path, tiny_wan_dir):
    work = tmp_path / "w"
    recipe = write_recipe(tmp_path / "r.yaml", **{"calibration.stage2.steps": 0})
    run("convert", tiny_wan_dir, "-o", work, "--recipe", recipe, "--linear-keys", "all", "--quant", "none")
    assert json.loads((work / "sla2_config.json").read_text())["linear_keys"] == "all"
    assert "linear branch over all keys" in run("inspect", work).stdout
    model = slaconv.from_pretrained(work)
    procs = slaconv.install.sla2_processors(model)
    assert procs and all(p.config.linear_keys == "all" for p in procs.values())
    proc = next(iter(procs.values()))
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 256, proc.heads, proc.head_dim, generator=g) for _ in range(3))
    with torch.no_grad():
        over_all = proc.sparse_attention(q, k, v)
        proc.config = proc.config.replace(linear_keys="unselected")
        over_rest = proc.sparse_attention(q, k, v)
    assert not torch.allclose(over_all, over_rest, atol=1e-4)
