"""Alpha per query (``mixing: query``): the reference against an fp64 oracle written from docs/design.md section 1,
its gradients, and the setting through processor, recipe, work dir, inspect and stage 1."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import slaconv
from helpers import assert_saved_copy_runs_alike, make_wan, run, write_recipe
from slaconv.config import SLA2Config
from slaconv.install import sla2_
from slaconv.kernels import reference as R
from slaconv.recipe import Recipe, RecipeError
from slaconv.workdir import WorkDir


def random_inputs(b, h, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    k = k + 0.5 * torch.randn(1, 1, 1, d, generator=g)  # a key mean, which the estimate must not depend on
    wq = torch.eye(d) + 0.3 * torch.randn(h, d, d, generator=g)
    wk = torch.eye(d) + 0.3 * torch.randn(h, d, d, generator=g)
    return q, k, v, wq, wk, torch.randn(h, generator=g)


def fp64_query_mixing(q, k, v, block_mask, alpha_logit, bq, bk):
    """Per row, with explicit loops over heads, rows and key blocks: O_s, O_l (phi = softmax over d) and
    alpha_i = sigmoid(lse over the selected keys of q.k/sqrt(d) - lse over unselected blocks j of
    q.mean(K_j)/sqrt(d) + ln n_j + alpha_logit_h); 1 for a row with no unselected block."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, n, d = q.shape
    nk = math.ceil(n / bk)
    out = torch.zeros(b, h, n, d, dtype=torch.float64)
    alpha = torch.zeros(b, h, n, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kbar = [k[bi, hi, j * bk:(j + 1) * bk].mean(dim=0) for j in range(nk)]
            counts = [min(bk, n - j * bk) for j in range(nk)]
            for i in range(n):
                sel = [bool(block_mask[bi, hi, i // bq, j]) for j in range(nk)]
                keys = torch.tensor([sel[t // bk] for t in range(n)])
                s = k[bi, hi] @ q[bi, hi, i] / math.sqrt(d)
                lse_sel = torch.logsumexp(s[keys], dim=0)
                o_s = torch.softmax(s[keys], dim=0) @ v[bi, hi][keys]
                tail = [float(q[bi, hi, i] @ kbar[j]) / math.sqrt(d) + math.log(counts[j]) for j in range(nk)
                        if not sel[j]]
                if not tail:
                    alpha[bi, hi, i], out[bi, hi, i] = 1.0, o_s
                    continue
                a = torch.sigmoid(lse_sel - torch.logsumexp(torch.tensor(tail, dtype=torch.float64), dim=0)
                                  + alpha_logit[hi].double())
                kern = torch.softmax(k[bi, hi], dim=-1)[~keys] @ torch.softmax(q[bi, hi, i], dim=0)
                o_l = (kern @ v[bi, hi][~keys]) / (kern.sum() + R.LINEAR_EPS)
                alpha[bi, hi, i], out[bi, hi, i] = a, a * o_s + (1 - a) * o_l
    return out, alpha


@pytest.mark.parametrize("n,bq,bk,topk", [(256, 64, 64, 0.25), (333, 128, 64, 0.3), (130, 64, 128, 0.01),
                                         (200, 64, 64, 1.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_query_mixing_matches_fp64(n, bq, bk, topk, seed):
    q, k, v, wq, wk, logit = random_inputs(1, 2, n, 16, seed)
    mask = R.hard_topk_mask(R.router_scores(q, k, wq, wk, bq, bk), R.topk_count(topk, math.ceil(n / bk)))
    expected, alpha = fp64_query_mixing(q, k, v, mask, logit, bq, bk)
    out = R.sla2_attention_reference(q, k, v, wq, wk, logit, topk=topk, block_q=bq, block_k=bk, mixing="query")
    assert (out.double() - expected).norm() / expected.norm() < 1e-5
    if topk == 1.0:  # every block selected: alpha 1, the output is the sparse branch alone
        assert bool((alpha == 1).all())
        o_s = R.sla2_attention_reference(q, k, v, wq, wk, torch.full((2,), math.inf), topk=1.0, block_q=bq,
                                         block_k=bk)
        assert torch.equal(out, o_s)
    else:  # alpha really varies per query, and the per-head mix is another output
        assert float(alpha.std(dim=-1).min()) > 1e-3
        head = R.sla2_attention_reference(q, k, v, wq, wk, logit, topk=topk, block_q=bq, block_k=bk)
        assert (head.double() - expected).norm() / expected.norm() > 1e-3


def test_low_bit_query_mixing_takes_the_sparse_log_row_sum_from_the_quantised_scores():
    """int8: alpha_i comes from the int8 scores' log row sum; against the oracle it differs only by quantisation."""
    q, k, v, wq, wk, logit = random_inputs(1, 2, 256, 32, 7)
    mask = R.hard_topk_mask(R.router_scores(q, k, wq, wk, 64, 64), 1)
    expected, _ = fp64_query_mixing(q, k, v, mask, logit, 64, 64)
    exact = R.sla2_attention_reference(q, k, v, wq, wk, logit, topk=0.25, block_q=64, block_k=64, mixing="query")
    low = R.sla2_attention_reference(q, k, v, wq, wk, logit, topk=0.25, block_q=64, block_k=64, mixing="query",
                                     quant="int8")
    assert (low - exact).norm() / exact.norm() > 1e-5  # quantisation is on
    assert (low.double() - expected).norm() / expected.norm() < 2e-2


def test_gradient_reaches_alpha_logit_and_not_through_the_mass_estimate():
    """d out is the gradient of alpha_i O_s + (1 - alpha_i) O_l with alpha_i a constant per row, plus
    d alpha_logit = sum g (O_s - O_l) alpha (1 - alpha)."""
    q, k, v, wq, wk, logit = random_inputs(1, 2, 256, 16, 3)
    g = torch.Generator().manual_seed(9)
    grad_out = torch.randn(1, 2, 256, 16, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, logit)]
    kwargs = dict(topk=0.25, block_q=64, block_k=64)
    out = R.sla2_attention_reference(*leaves[:3], wq, wk, leaves[3], mixing="query", **kwargs)
    (out * grad_out).sum().backward()

    mask = R.hard_topk_mask(R.router_scores(q, k, wq, wk, 64, 64), 1)
    _, alpha = fp64_query_mixing(q, k, v, mask, logit, 64, 64)
    alpha = alpha.float().unsqueeze(-1)
    qkv = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o_s = R.sla2_attention_reference(*qkv, wq, wk, torch.full((2,), math.inf), **kwargs)
    o_l = R.sla2_attention_reference(*qkv, wq, wk, torch.full((2,), -math.inf), **kwargs)
    ((alpha * o_s + (1 - alpha) * o_l) * grad_out).sum().backward()
    for got, want in zip(leaves[:3], qkv):
        assert (got.grad - want.grad).norm() / want.grad.norm() < 1e-4
    d_logit = ((o_s - o_l) * grad_out * alpha * (1 - alpha)).sum(dim=(0, 2, 3))
    assert torch.allclose(leaves[3].grad, d_logit.detach(), rtol=1e-4, atol=1e-6)
    assert float(leaves[3].grad.abs().min()) > 0


def test_fitted_start_minimises_the_fp64_attention_error_over_the_shift():
    """convert's start for mixing: query: per head, no shift on the grid around it gives the fp64 oracle a lower
    error against full attention on the rows it fits."""
    q, k, v, wq, wk, _ = random_inputs(1, 2, 256, 16, 5)
    mask = R.hard_topk_mask(R.router_scores(q, k, wq, wk, 64, 64), 1)
    shift = R.fit_query_shift(q, k, v, mask, 64, 64)  # 4 query blocks: every row
    s = q.double() @ k.double().transpose(-1, -2) / 4.0
    dense = torch.softmax(s, dim=-1) @ v.double()

    def error(c):
        out, _ = fp64_query_mixing(q, k, v, mask, c, 64, 64)
        return (out - dense).square().sum(dim=(0, 2, 3))

    best = error(shift)
    for delta in (-0.5, -0.04, 0.04, 0.5):
        assert bool((best <= error(shift + delta) + 1e-9).all()), delta
    assert bool((best < error(torch.zeros(2)) - 1e-9).all()) or float(shift.abs().max()) < 0.02


def test_processor_runs_query_mixing_and_head_mixing_is_unchanged():
    model = make_wan()
    procs = sla2_(model, SLA2Config(topk=0.25, block_q=64, block_k=64, quant="none"))
    proc = procs["blocks.0.attn1"]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 256, 2, 24, generator=g) for _ in range(3))
    head = proc.sparse_attention(q, k, v)
    direct = R.sla2_attention_reference(*(t.transpose(1, 2) for t in (q, k, v)), proc.router_q, proc.router_k,
                                        proc.alpha_logit, topk=0.25, block_q=64, block_k=64).transpose(1, 2)
    assert torch.equal(head, direct)
    assert "mixing" not in proc.config.to_dict()  # the default is written as before: not at all
    proc.config = proc.config.replace(mixing="query")
    assert proc.config.to_dict()["mixing"] == "query"
    query = proc.sparse_attention(q, k, v)
    assert not torch.allclose(query, head, atol=1e-4)


def test_triton_and_reference_agree_on_query_mixing():
    """The op reaches the kernels' per-query alpha and gives the reference's output (fp32, interpreter)."""
    from slaconv.kernels.ops import sla2_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 320, 2, 64, generator=g).to(device) for _ in range(3))
    router = [(torch.randn(2, 64, 64, generator=g) / 8).to(device) for _ in range(2)]
    alpha_logit = torch.randn(2, generator=g).to(device)
    outs = [sla2_attention(q, k, v, *router, alpha_logit, topk=0.4, block_q=64, block_k=64, mixing="query",
                           backend=backend) for backend in ("reference", "triton")]
    head = sla2_attention(q, k, v, *router, alpha_logit, topk=0.4, block_q=64, block_k=64, backend="triton")
    err = (outs[1] - outs[0]).norm() / outs[0].norm()
    assert float(err) < (1e-4 if device == "cpu" else 1e-2), float(err)  # TF32 products on a GPU
    assert not torch.allclose(outs[1], head, atol=1e-3)


def test_recipe_and_config_check_the_setting():
    assert Recipe().override({"sla2.mixing": "query"}).sla2.attention_config().mixing == "query"
    assert "mixing" not in Recipe().dump()
    with pytest.raises(RecipeError, match="sla2.mixing must be one of"):
        Recipe().override({"sla2.mixing": "token"})
    assert SLA2Config.from_dict({"mixing": "query"}).mixing == "query"
    assert SLA2Config.from_dict({}).mixing == "head"


def test_query_mixing_work_dir_converts_calibrates_inspects_and_round_trips(tmp_path, tiny_wan_dir):
    work, saved = tmp_path / "w", tmp_path / "saved"
    recipe = write_recipe(tmp_path / "r.yaml", **{"calibration.stage2.steps": 0})
    run("convert", tiny_wan_dir, "-o", work, "--recipe", recipe, "--mixing", "query")
    config = json.loads((work / "sla2_config.json").read_text())
    assert config["mixing"] == "query"
    start = load_file(str(work / "sla2.safetensors"))
    starts = config["alpha_init"]["initial_alpha_logit"]
    assert all(-8 <= x <= 8 for v in starts.values() for x in v) and len({x for v in starts.values() for x in v}) > 1
    s1 = json.loads(run("calibrate", work, "--stage", "1", "--json").stdout)["stage1"]
    assert s1["heldout_attention_rel_mse_after"] <= s1["heldout_attention_rel_mse_before"] * 1.02, s1
    stored = load_file(str(work / "sla2.safetensors"))
    assert any(not torch.equal(stored[k], start[k]) for k in stored if k.endswith("alpha_logit"))
    assert "alpha per query" in run("inspect", work).stdout
    model, _ = assert_saved_copy_runs_alike(work, saved)
    assert all(p.config.mixing == "query" for p in slaconv.install.sla2_processors(model).values())
    assert WorkDir(saved).read_sla2_config().attention.mixing == "query"
    assert (saved / "sla2.safetensors").read_bytes() == (work / "sla2.safetensors").read_bytes()
