"""Alpha per query from the query and its block's pooled tail mass (``mixing: query-block``): the reference
against an fp64 oracle written from docs/design.md section 1, its gradients, the Triton kernels against the
oracle (forward and every gradient) and the reference (low-bit), and the processor.  The setting through
convert, stage 1, inspect and a saved copy: tests/test_query_linear_mixing.py, with query-linear's."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from helpers import assert_row_mixing_matches_oracle
from slaconv.config import SLA2Config
from slaconv.kernels import reference as R
from slaconv.kernels.launch import DEFAULT_LAUNCH
from slaconv.kernels.ops import sla2_attention
from slaconv.processor import SLA2Processor

needs_kernels = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                   reason="the Triton kernels need CUDA or the interpreter")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOLERANCES = (1e-4, 1e-3) if DEVICE == "cpu" else (1e-2, 2e-2)
"""(output, gradient) relative L2 bounds of the fp32 kernels: exact fp32 in the interpreter, TF32 products on a GPU."""


def random_inputs(b, h, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    k = k + 0.5 * torch.randn(1, h, 1, d, generator=g, dtype=torch.float64)  # keys share a mean, as real ones do
    wq = torch.eye(d) + 0.3 * torch.randn(h, d, d, generator=g)
    wk = torch.eye(d) + 0.3 * torch.randn(h, d, d, generator=g)
    weight = torch.randn(h, d, generator=g, dtype=torch.float64)
    return q, k, v, wq, wk, torch.randn(h, generator=g, dtype=torch.float64), weight


def fp64_query_block(q, k, v, block_mask, alpha_logit, weight, bq, bk):
    """Per row, with explicit loops: O_s over the selected keys, O_l (phi = softmax over d) over the others, and
    alpha_i = sigmoid(lse_sel,i - lse_pool,b + q_i . w_h / sqrt(d) + a_h), where lse_sel is the log-sum-exp of
    the row's selected logits and lse_pool that of mean(q over block b) . mean(K_j) / sqrt(d) + ln |K_j| over
    the unselected key blocks j, both held constant for the gradient; O_s alone for a row with every key
    selected."""
    b, h, n, d = q.shape
    rows = []
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                qb = i // bq
                keys = torch.tensor([bool(block_mask[bi, hi, qb, t // bk]) for t in range(n)])
                s = k[bi, hi] @ q[bi, hi, i] / math.sqrt(d)
                o_s = torch.softmax(s[keys], dim=0) @ v[bi, hi][keys]
                if keys.all():
                    rows.append(o_s)
                    continue
                q_bar = q[bi, hi, qb * bq:min(n, (qb + 1) * bq)].detach().mean(dim=0)
                pooled = [q_bar @ k[bi, hi, j:j + bk].mean(dim=0) / math.sqrt(d) + math.log(len(k[bi, hi, j:j + bk]))
                          for j in range(0, n, bk) if not block_mask[bi, hi, qb, j // bk]]
                gap = (torch.logsumexp(s[keys], dim=0) - torch.logsumexp(torch.stack(pooled), dim=0)).detach()
                a = torch.sigmoid(gap + q[bi, hi, i] @ weight[hi] / math.sqrt(d) + alpha_logit[hi])
                kern = torch.softmax(k[bi, hi], dim=-1)[~keys] @ torch.softmax(q[bi, hi, i], dim=0)
                o_l = (kern @ v[bi, hi][~keys]) / (kern.sum() + R.LINEAR_EPS)
                rows.append(a * o_s + (1 - a) * o_l)
    return torch.stack(rows).view(b, h, n, d)


def _mask(q, k, wq, wk, bq, bk, topk):
    n = q.shape[2]
    return R.hard_topk_mask(R.router_scores(q.float(), k.float(), wq, wk, bq, bk), R.topk_count(topk, math.ceil(n / bk)))


@pytest.mark.parametrize("n,bq,bk,topk", [(256, 64, 64, 0.25), (333, 128, 64, 0.3), (200, 64, 64, 1.0)])
def test_query_block_mixing_and_its_gradients_match_fp64(n, bq, bk, topk):
    seed = int(torch.randint(1 << 30, ()))
    assert_row_mixing_matches_oracle("query-block", fp64_query_block, random_inputs(1, 2, n, 16, seed), bq, bk, topk,
                                     seed)


def test_query_block_differs_from_query_and_from_query_linear():
    """The same weights under the three per-row mixings give three different outputs: the block's pooled
    estimate is neither the row's own (``query``) nor absent (``query-linear``)."""
    q, k, v, wq, wk, logit, weight = (t.float() for t in random_inputs(1, 2, 256, 16, 7))
    common = dict(topk=0.25, block_q=64, block_k=64)
    block = R.sla2_attention_reference(q, k, v, wq, wk, logit, mixing="query-block", alpha_weight=weight, **common)
    row = R.sla2_attention_reference(q, k, v, wq, wk, logit, mixing="query", **common)
    linear = R.sla2_attention_reference(q, k, v, wq, wk, logit, mixing="query-linear", alpha_weight=weight, **common)
    assert (block - row).abs().max() > 1e-3 and (block - linear).abs().max() > 1e-3


@needs_kernels
@pytest.mark.parametrize("block_tail_launch", [0, 1], ids=["torch", "one-launch"])
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_triton_forward_and_gradients_match_fp64(layout, block_tail_launch):
    """The kernels' path (the block estimate from the router's block means, by torch operations or in one
    launch; the row term from the Q pre-pass, read per row by the sparse launch; the rows' logit gradients from
    the backward's row pass) against the fp64 oracle: O and the gradients of q, k, v, alpha_logit and
    alpha_weight."""
    launch = dataclasses.replace(DEFAULT_LAUNCH, block_tail_launch=block_tail_launch)
    n, bq, bk, topk = 333, 128, 64, 0.3
    seed = int(torch.randint(1 << 30, ()))
    q, k, v, wq, wk, logit, weight = random_inputs(1, 2, n, 64, seed)
    mask = _mask(q, k, wq, wk, bq, bk, topk)
    leaves = [t.float().to(DEVICE).requires_grad_(True) for t in (q, k, v, logit, weight)]
    qkv = [t.transpose(1, 2) if layout == "bnhd" else t for t in leaves[:3]]
    out = sla2_attention(*qkv, wq.to(DEVICE), wk.to(DEVICE), leaves[3], topk=topk, block_q=bq, block_k=bk,
                         backend="triton", layout=layout, mixing="query-block", alpha_weight=leaves[4], launch=launch)
    out = (out.transpose(1, 2) if layout == "bnhd" else out).cpu()
    oracle = [t.clone().requires_grad_(True) for t in (q, k, v, logit, weight)]
    # the oracle takes the router's mask as the kernels computed it: the router is tested on its own
    want = fp64_query_block(oracle[0], oracle[1], oracle[2], mask, oracle[3], oracle[4], bq, bk)
    out_tol, grad_tol = FP32_TOLERANCES
    assert ((out.double() - want).norm() / want.norm()).item() < out_tol, seed
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, go.float())
    expected = torch.autograd.grad(want, oracle, go)
    for name, g, e in zip(("q", "k", "v", "alpha_logit", "alpha_weight"), got, expected):
        assert ((g.double().cpu() - e).norm() / e.norm()).item() < grad_tol, (seed, name)


@needs_kernels
@pytest.mark.parametrize("block_tail_launch", [0, 1], ids=["torch", "one-launch"])
def test_triton_lowbit_matches_the_reference(block_tail_launch):
    """INT8 QK: the block estimate in the low-bit loop's frame (keys less their mean), against the reference's
    emulation of the same mode."""
    launch = dataclasses.replace(DEFAULT_LAUNCH, block_tail_launch=block_tail_launch)
    q, k, v, wq, wk, logit, weight = (t.float().to(DEVICE) for t in random_inputs(1, 2, 333, 64, 11))
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    args = (q, k, v, wq, wk, logit)
    common = dict(topk=0.3, block_q=128, block_k=64, quant="int8", mixing="query-block", alpha_weight=weight)
    kernel = sla2_attention(*args, backend="triton", launch=launch, **common)
    ref = sla2_attention(*args, backend="reference", **common)
    assert ((kernel - ref).norm() / ref.norm()).item() < 2e-2


def test_alpha_does_not_depend_on_the_keys_frame():
    """The low-bit modes score keys less their mean; the row's lse_sel moves by q_i . mean(K) / sqrt(d) and the
    block estimate, from the block's mean query, by the row's own term too, so the INT8 output stays within
    its quantisation error of the bf16 one (keys with a large common mean)."""
    q, k, v, wq, wk, logit, weight = (t.float() for t in random_inputs(1, 2, 256, 32, 9))
    k = k + 2.0 * torch.randn(1, 2, 1, 32, generator=torch.Generator().manual_seed(1))
    common = dict(topk=0.25, block_q=64, block_k=64, mixing="query-block", alpha_weight=weight)
    exact = R.sla2_attention_reference(q, k, v, wq, wk, logit, **common)
    lowbit = R.sla2_attention_reference(q, k, v, wq, wk, logit, quant="int8", **common)
    assert ((lowbit - exact).norm() / exact.norm()).item() < 2e-2


def test_processor_holds_the_weight():
    proc = SLA2Processor(4, 32, SLA2Config(mixing="query-block"))
    assert torch.equal(proc.alpha_weight, torch.zeros(4, 32)) and "alpha_weight" in proc.sla2_state()
    with pytest.raises(ValueError, match="cannot switch the mixing"):
        proc.config = SLA2Config(mixing="query")
