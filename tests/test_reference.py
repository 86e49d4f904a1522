"""The reference SLA2 attention against an independent fp64 implementation of docs/design.md section 1."""

from __future__ import annotations

import math

import pytest
import torch

from slaconv.kernels import reference as R


def fp64_sla2(q, k, v, wq, wk, alpha_logit, topk, bq, bk, soft_mask=None, always_kept=(0, 0)):
    """Straightforward dense fp64 SLA2: explicit block loops for pooling, N x N masked maps.

    ``always_kept``: key blocks every row selects besides the top-k of the others.  Returns (output, block
    mask, scores).  Written from docs/design.md independently of kernels/reference.py.
    """
    q, k, v, wq, wk = (t.double() for t in (q, k, v, wq, wk))
    b, h, n, d = q.shape
    nq, nk = math.ceil(n / bq), math.ceil(n / bk)
    ks = k - k.mean(dim=2, keepdim=True)
    qbar = torch.stack([q[:, :, i * bq:min(n, (i + 1) * bq)].mean(dim=2) for i in range(nq)], dim=2)
    kbar = torch.stack([ks[:, :, j * bk:min(n, (j + 1) * bk)].mean(dim=2) for j in range(nk)], dim=2)
    scores = (qbar @ wq) @ (kbar @ wk).transpose(-1, -2) / math.sqrt(d)
    kept = list(range(*always_kept))
    others = torch.tensor([j for j in range(nk) if j not in kept], dtype=torch.long)
    n_sel = min(max(round(topk * len(others)), 1), len(others))
    if soft_mask is None:
        mask = torch.zeros_like(scores)
        mask[..., kept] = 1.0
        if len(others):
            order = scores[..., others].argsort(dim=-1, descending=True)
            mask.scatter_(-1, others[order[..., :n_sel]], 1.0)
    else:
        mask = soft_mask.double()
    tok = torch.zeros(b, h, n, n, dtype=torch.float64)
    for i in range(nq):
        for j in range(nk):
            tok[:, :, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk] = mask[:, :, i, j, None, None]
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    p = torch.exp(s - s.amax(dim=-1, keepdim=True)) * tok
    o_s = (p / p.sum(dim=-1, keepdim=True)) @ v
    phi_q, phi_k = torch.softmax(q, dim=-1), torch.softmax(k, dim=-1)
    a = (phi_q @ phi_k.transpose(-1, -2)) * (1 - tok)
    o_l = (a @ v) / (a.sum(dim=-1, keepdim=True) + R.LINEAR_EPS)
    alpha = torch.sigmoid(alpha_logit.double()).view(1, h, 1, 1)
    # a row that selects every key block leaves the linear branch nothing: its output is O_s alone
    alpha = torch.where((tok == 1).all(dim=-1, keepdim=True), torch.ones_like(alpha), alpha)
    return alpha * o_s + (1 - alpha) * o_l, mask, scores


def _inputs(b, h, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    k = k + 0.5 * torch.randn(1, 1, 1, d, generator=g)  # a non-zero key mean, as real models have
    wq = torch.eye(d) + 0.3 * torch.randn(h, d, d, generator=g)
    wk = torch.eye(d) + 0.3 * torch.randn(h, d, d, generator=g)
    alpha = torch.randn(h, generator=g)
    return q, k, v, wq, wk, alpha


@pytest.mark.parametrize("n,bq,bk,topk", [(256, 64, 64, 0.25), (200, 64, 64, 0.5), (333, 128, 64, 0.3),
                                         (100, 128, 128, 1.0), (130, 64, 128, 0.01)])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_matches_fp64(n, bq, bk, topk, seed):
    q, k, v, wq, wk, alpha = _inputs(2, 3, n, 32, seed)
    expected, mask, scores = fp64_sla2(q, k, v, wq, wk, alpha, topk, bq, bk)
    got_scores = R.router_scores(q, k, wq, wk, bq, bk)
    assert torch.allclose(got_scores.double(), scores, rtol=1e-4, atol=1e-4)
    got_mask = R.hard_topk_mask(got_scores, R.topk_count(topk, math.ceil(n / bk)))
    assert torch.equal(got_mask.double(), mask)
    out = R.sla2_attention_reference(q, k, v, wq, wk, alpha, topk=topk, block_q=bq, block_k=bk)
    err = (out.double() - expected).norm() / expected.norm()
    assert err < 1e-5, err


@pytest.mark.parametrize("n,bq,bk,topk,kept", [(256, 64, 64, 0.25, (3, 4)), (333, 128, 64, 0.3, (0, 2)),
                                                (200, 64, 64, 0.01, (1, 4)), (130, 64, 64, 0.5, (0, 3))])
def test_always_kept_range_matches_fp64(n, bq, bk, topk, kept):
    """Joint attention's text blocks: kept in every row, not counted by top-k, and the output is SLA2 with
    that mask (the linear branch leaves them out)."""
    q, k, v, wq, wk, alpha = _inputs(1, 2, n, 32, n + kept[0])
    expected, mask, _ = fp64_sla2(q, k, v, wq, wk, alpha, topk, bq, bk, always_kept=kept)
    nk = math.ceil(n / bk)
    scores = R.router_scores(q, k, wq, wk, bq, bk)
    got_mask = R.selection_mask(scores, topk, kept)
    assert torch.equal(got_mask.double(), mask)
    assert (got_mask.sum(-1) == R.selection_count(topk, nk, kept)).all()
    out = R.sla2_attention_reference(q, k, v, wq, wk, alpha, topk=topk, block_q=bq, block_k=bk, always_kept=kept)
    err = (out.double() - expected).norm() / expected.norm()
    assert err < 1e-5, err
    soft = R.selection_mask(scores, topk, kept, soft_tau=0.1)
    assert torch.equal(soft[..., kept[0]:kept[1]], torch.ones_like(soft[..., kept[0]:kept[1]]))
    assert torch.allclose(soft.sum(-1), torch.full_like(soft.sum(-1), R.selection_count(topk, nk, kept)), atol=1e-3)
    with pytest.raises(ValueError, match="always_kept"):
        R.selection_mask(scores, topk, (2, nk + 1))


def test_soft_mask_at_zero_one_equals_hard():
    q, k, v, wq, wk, alpha = _inputs(1, 2, 200, 32, 3)
    scores = R.router_scores(q, k, wq, wk, 64, 64)
    hard = R.hard_topk_mask(scores, 2)
    as_float = R.sla2_attention_reference(q, k, v, wq, wk, alpha, topk=0.5, block_q=64, block_k=64, mask=hard.float())
    as_bool = R.sla2_attention_reference(q, k, v, wq, wk, alpha, topk=0.5, block_q=64, block_k=64, mask=hard)
    assert torch.equal(as_float, as_bool)
    # A very sharp SoftTop-k converges to the hard mask, and so does the output.
    soft = R.sla2_attention_reference(q, k, v, wq, wk, alpha, topk=0.5, block_q=64, block_k=64, soft_tau=1e-6)
    assert (soft - as_bool).norm() / as_bool.norm() < 1e-4


def test_soft_mask_output_matches_fp64_with_fractional_mask():
    q, k, v, wq, wk, alpha = _inputs(1, 2, 150, 32, 4)
    scores = R.router_scores(q, k, wq, wk, 64, 64)
    soft = R.soft_topk_mask(scores, 2, tau=0.5)
    assert torch.allclose(soft.sum(-1), torch.full_like(soft.sum(-1), 2.0), atol=1e-4)
    assert ((soft > 0.01) & (soft < 0.99)).any(), "the test needs genuinely fractional mask entries"
    expected, _, _ = fp64_sla2(q, k, v, wq, wk, alpha, 0.5, 64, 64, soft_mask=soft)
    got = R.sla2_attention_reference(q, k, v, wq, wk, alpha, topk=0.5, block_q=64, block_k=64, mask=soft)
    assert (got.double() - expected).norm() / expected.norm() < 1e-5


def test_soft_topk_gradients_reach_router():
    q, k, v, wq, wk, alpha = _inputs(1, 2, 192, 32, 5)
    wq.requires_grad_(True)
    alpha.requires_grad_(True)
    out = R.sla2_attention_reference(q, k, v, wq, wk, alpha, topk=0.34, block_q=64, block_k=64, soft_tau=0.1)
    out.square().mean().backward()
    assert wq.grad is not None and wq.grad.abs().sum() > 0
    assert alpha.grad is not None and torch.isfinite(alpha.grad).all()


def test_all_blocks_selected_gives_pure_sparse_branch():
    """topk 1: every row selects every block, so the output is full attention (O_s) whatever alpha is, and
    alpha gets no gradient; q, k, v get full attention's gradients (fp64 autograd oracle)."""
    q, k, v, wq, wk, _ = _inputs(1, 2, 150, 32, 6)
    alpha = torch.tensor([0.3, -1.2], requires_grad=True)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = R.sla2_attention_reference(*leaves, wq, wk, alpha, topk=1.0, block_q=64, block_k=64)
    oracle = [t.double().requires_grad_(True) for t in (q, k, v)]
    full = torch.softmax(oracle[0] @ oracle[1].transpose(-1, -2) / math.sqrt(32), dim=-1) @ oracle[2]
    assert (out.double() - full).norm() / full.norm() < 1e-5
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, [*leaves, alpha], grad_out)
    want = torch.autograd.grad(full, oracle, grad_out.double())
    for got, ref in zip(grads, want):
        assert (got.double() - ref).norm() / ref.norm() < 1e-5
    assert torch.count_nonzero(grads[3]) == 0


def test_rows_selecting_every_block_take_the_sparse_branch_alone():
    """Per query-block row: rows whose mask selects every key block give O_s and no alpha gradient, the others
    mix both branches; output and gradients against the fp64 oracle, on a mask that mixes both kinds of row."""
    q, k, v, wq, wk, alpha = _inputs(2, 3, 300, 32, 12)
    nq, nk = math.ceil(300 / 64), math.ceil(300 / 64)
    mask = torch.rand(2, 3, nq, nk, generator=torch.Generator().manual_seed(2)) < 0.5
    mask[..., 0] = True  # every row keeps at least one block
    mask[:, :, 1] = True  # query block 1 selects everything ...
    mask[1, 2, 3] = True  # ... and so does block 3 of one (batch, head)
    mask[0, :, 2] = False  # while block 2 of batch 0 keeps only one
    mask[0, :, 2, 4] = True
    assert not mask.all(-1).all() and mask.all(-1).any()
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, alpha)]
    out = R.sla2_attention_reference(*leaves[:3], wq, wk, leaves[3], topk=0.5, block_q=64, block_k=64,
                                     mask=mask)
    oracle = [t.double().requires_grad_(True) for t in (q, k, v, alpha)]
    want, _, _ = fp64_sla2(*oracle[:3], wq, wk, oracle[3], 0.5, 64, 64, soft_mask=mask.double())
    assert (out.double() - want).norm() / want.norm() < 1e-5
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, leaves, grad_out)
    grads_want = torch.autograd.grad(want, oracle, grad_out.double())
    for name, got, ref in zip("q k v alpha".split(), grads, grads_want):
        assert (got.double() - ref).norm() / ref.norm() < 1e-5, name
    # alpha's gradient comes from the mixed rows only: with every row full it would be zero
    only_full = mask.clone()
    only_full[:] = True
    out_full = R.sla2_attention_reference(*leaves[:3], wq, wk, leaves[3], topk=0.5, block_q=64, block_k=64,
                                          mask=only_full)
    assert torch.count_nonzero(torch.autograd.grad(out_full, leaves[3], grad_out)[0]) == 0


def test_topk_count_rounds_and_keeps_at_least_one_block():
    assert R.topk_count(0.03, 512) == 15
    assert R.topk_count(0.001, 10) == 1
    assert R.topk_count(1.0, 7) == 7
    assert R.topk_count(0.5, 3) == 2


def test_ragged_block_mean_uses_true_count():
    x = torch.arange(10.0).view(1, 1, 10, 1)
    means = R.block_mean(x, 4)
    assert means.flatten().tolist() == [1.5, 5.5, 8.5]


def test_query_block_subset_equals_rows_of_full_output():
    q, k, v, wq, wk, alpha = _inputs(1, 2, 333, 32, 7)
    full = R.sla2_attention_reference(q, k, v, wq, wk, alpha, topk=0.3, block_q=64, block_k=64)
    blocks = torch.tensor([1, 5])  # block 5 is the ragged last one (rows 320..332)
    part = R.sla2_attention_reference(q, k, v, wq, wk, alpha, topk=0.3, block_q=64, block_k=64, q_blocks=blocks)
    rows = torch.cat([torch.arange(64, 128), torch.arange(320, 333)])
    assert torch.allclose(part, full[:, :, rows], atol=1e-6)


def test_chunking_does_not_change_the_result():
    q, k, v, wq, wk, alpha = _inputs(1, 2, 400, 32, 8)
    a = R.sla2_attention_reference(q, k, v, wq, wk, alpha, topk=0.3, block_q=64, block_k=64, chunk_q_blocks=1)
    b = R.sla2_attention_reference(q, k, v, wq, wk, alpha, topk=0.3, block_q=64, block_k=64, chunk_q_blocks=16)
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("quant", ["int8", "int8-fp8"])
def test_fake_quantised_forward_is_close_and_differentiable(quant):
    q, k, v, wq, wk, alpha = _inputs(1, 2, 256, 64, 9)
    exact = R.sla2_attention_reference(q, k, v, wq, wk, alpha, topk=0.25, block_q=64, block_k=64)
    qq = q.clone().requires_grad_(True)
    low = R.sla2_attention_reference(qq, k, v, wq, wk, alpha, topk=0.25, block_q=64, block_k=64, quant=quant)
    err = (low - exact).norm() / exact.norm()
    cos = torch.nn.functional.cosine_similarity(low.flatten(), exact.flatten(), dim=0)
    assert 0 < err < 5e-2 and cos > 0.999, (err, cos)
    low.sum().backward()
    assert torch.isfinite(qq.grad).all() and qq.grad.abs().sum() > 0


def test_initial_alpha_is_selected_mass():
    q, k, v, wq, wk, _ = _inputs(1, 2, 128, 32, 10)
    mask = R.hard_topk_mask(R.router_scores(q, k, wq, wk, 64, 64), 1)
    alpha = R.initial_alpha(q, k, mask, 64, 64)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32), dim=-1)
    tok = mask.float().repeat_interleave(64, 2).repeat_interleave(64, 3)
    expected = (p * tok).sum(-1).mean(dim=(0, 2))
    assert torch.allclose(alpha, expected, atol=1e-5)


def fp64_hedgehog(x, w):
    """[softmax(x W_h), softmax(-x W_h)] per head, in fp64, with explicit per-head products."""
    proj = torch.stack([x[:, i].double() @ w[i].double() for i in range(x.shape[1])], dim=1)
    e_pos, e_neg = torch.exp(proj - proj.amax(-1, keepdim=True)), torch.exp(-proj - (-proj).amax(-1, keepdim=True))
    return torch.cat([e_pos / e_pos.sum(-1, keepdim=True), e_neg / e_neg.sum(-1, keepdim=True)], dim=-1)


def test_hedgehog_features_are_nonnegative_halves_summing_to_one():
    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(2, 3, 50, 16, generator=g) * 3, torch.randn(3, 16, 8, generator=g)
    phi = R.feature_map(x, w)
    assert phi.shape == (2, 3, 50, 16) and phi.dtype == torch.float32
    assert (phi >= 0).all()
    for half in (phi[..., :8], phi[..., 8:]):
        assert torch.allclose(half.sum(-1), torch.ones(2, 3, 50), atol=1e-6)
    assert torch.allclose(phi.double(), fp64_hedgehog(x, w), atol=1e-6)


@pytest.mark.parametrize("n,bq,bk,topk", [(256, 64, 64, 0.25), (333, 128, 64, 0.3), (130, 64, 128, 0.01)])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_with_hedgehog_features_matches_fp64(n, bq, bk, topk, seed):
    """The linear branch with learned features against a dense fp64 computation of its definition."""
    q, k, v, wq, wk, alpha = _inputs(2, 3, n, 32, seed)
    g = torch.Generator().manual_seed(100 + seed)
    fq, fk = (torch.randn(3, 32, 16, generator=g) * 0.5 for _ in range(2))
    expected_sparse, mask, _ = fp64_sla2(q, k, v, wq, wk, alpha, topk, bq, bk)
    tok = mask.repeat_interleave(bq, dim=2)[:, :, :n].repeat_interleave(bk, dim=3)[..., :n]
    a = (fp64_hedgehog(q, fq) @ fp64_hedgehog(k, fk).transpose(-1, -2)) * (1 - tok)
    o_l = (a @ v.double()) / (a.sum(dim=-1, keepdim=True) + R.LINEAR_EPS)
    a_soft = (torch.softmax(q.double(), -1) @ torch.softmax(k.double(), -1).transpose(-1, -2)) * (1 - tok)
    o_l_soft = (a_soft @ v.double()) / (a_soft.sum(dim=-1, keepdim=True) + R.LINEAR_EPS)
    # the fp64 oracle mixes O_s and softmax-feature O_l; swap in the hedgehog O_l with the same row alpha
    full_rows = (tok == 1).all(dim=-1, keepdim=True)
    a_row = torch.where(full_rows, torch.ones(1), torch.sigmoid(alpha.double()).view(1, 3, 1, 1))
    expected = expected_sparse + (1 - a_row) * (o_l - o_l_soft)
    out = R.sla2_attention_reference(q, k, v, wq, wk, alpha, topk=topk, block_q=bq, block_k=bk,
                                     feature_q=fq, feature_k=fk)
    err = (out.double() - expected).norm() / expected.norm()
    assert err < 1e-5, err
    softmax_out = R.sla2_attention_reference(q, k, v, wq, wk, alpha, topk=topk, block_q=bq, block_k=bk)
    if not full_rows.all():  # the feature map really changes the result where a linear branch exists
        assert (softmax_out.double() - expected).norm() / expected.norm() > 1e-3


def test_feature_weights_come_in_pairs():
    q, k, v, wq, wk, alpha = _inputs(1, 3, 128, 32, 0)
    with pytest.raises(ValueError, match="together"):
        R.sla2_attention_reference(q, k, v, wq, wk, alpha, topk=0.5, block_q=64, block_k=64,
                                   feature_q=torch.zeros(3, 32, 16))
