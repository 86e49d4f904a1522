"""SLA2 Triton kernels against the PyTorch reference (and an independent dense fp64 oracle).

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py before
anything imports Triton) on small shapes; with CUDA the same tests run on the GPU at larger sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import pytest
import torch

from slaconv.errors import SlaconvError
from slaconv.kernels import reference

triton = pytest.importorskip("triton")

from slaconv.kernels import sla2_gluon as gluon_kernels  # noqa: E402
from slaconv.kernels import sla2_gluon_backward as gluon_backward  # noqa: E402
from slaconv.kernels import sla2_triton as S  # noqa: E402
from slaconv.kernels import sla2_triton_backward as backward_kernels  # noqa: E402
from slaconv.kernels import sla2_triton_forward as forward_kernels  # noqa: E402
from slaconv.kernels.launch import DEFAULT_LAUNCH, PLAIN_LAUNCH, LaunchConfig  # noqa: E402
from slaconv.kernels.ops import sla2_attention  # noqa: E402
from slaconv.kernels.sla2_triton_linear import signed_weights  # noqa: E402
from slaconv.kernels.spec import AttentionSpec  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

DEVICE = "cuda" if HAS_CUDA else "cpu"
if not HAS_CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no CUDA and TRITON_INTERPRET disabled", allow_module_level=True)

# CPU/interpreter: fp32 (exact interpreter dots) small shapes; GPU: bf16 at larger N.
if HAS_CUDA:
    DTYPE = torch.bfloat16
    SIZES = [(1, 3, 2000), (2, 2, 1333)]
    TOL = 1e-2
else:
    DTYPE = torch.float32
    SIZES = [(1, 2, 200), (1, 2, 333)]
    TOL = 1e-4


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(b, h, n, d, layout, dtype=DTYPE, seed=0, router_noise=0.1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (b, n, h, d) if layout == "bnhd" else (b, h, n, d)
    q, k, v = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(3))
    k = k + 0.5  # a non-zero key mean exercises the smoothing / LSE correction
    eye = torch.eye(d).repeat(h, 1, 1)
    rq = (eye + router_noise * torch.randn(h, d, d, generator=g)).to(DEVICE)
    rk = (eye + router_noise * torch.randn(h, d, d, generator=g)).to(DEVICE)
    al = torch.randn(h, generator=g).to(DEVICE)
    return q, k, v, rq, rk, al


def _to_bhnd(x, layout):
    return x.transpose(1, 2) if layout == "bnhd" else x


def _run_kernel(q, k, v, rq, rk, al, layout, launch=None, **spec):
    return S.sla2_attention_triton(q, k, v, rq, rk, al, AttentionSpec(**spec), layout=layout, launch=launch)


def _forward_outputs(q, k, v, rq, rk, al, topk, block_q, block_k, quant, layout, always_kept=(0, 0)):
    """The forward op's outputs (O, LUT, LSE, 1/den, H_all, z_all) with the default launch settings."""
    return S.sla2_fwd(q, k, v, rq, rk, al, topk, block_q, block_k, quant, *always_kept, layout, True,
                      DEFAULT_LAUNCH.as_ints())


def _run_reference(q, k, v, rq, rk, al, layout, **kw):
    qh, kh, vh = (_to_bhnd(t, layout) for t in (q, k, v))
    out = reference.sla2_attention_reference(qh, kh, vh, rq, rk, al, **kw)
    return _to_bhnd(out, layout)


def _leaf(*ts, dtype=None):
    return [t.detach().clone().to(dtype or t.dtype).requires_grad_(True) for t in ts]


# --------------------------------------------------------------------------------------------------
# forward + backward, quant none, against the reference
# --------------------------------------------------------------------------------------------------

CASES = [
    # (size idx, D, block_q, block_k, topk, layout)
    (0, 64, 128, 64, 0.3, "bnhd"),
    (1, 64, 64, 64, 0.5, "bhnd"),
    (1, 128, 128, 64, 0.2, "bnhd"),
    (0, 128, 64, 64, 1.0, "bhnd"),  # every block selected: O_l == 0
    (1, 64, 128, 64, 0.01, "bhnd"),  # one block per row
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{SIZES[c[0]][2]}-d{c[1]}-bq{c[2]}-top{c[4]}-{c[5]}")
def test_forward_backward_matches_reference(case):
    si, d, bq, bk, topk, layout = case
    b, h, n = SIZES[si]
    inputs = _inputs(b, h, n, d, layout, seed=si * 7 + d)
    _check_forward_and_gradients(inputs, layout, dict(topk=topk, block_q=bq, block_k=bk, quant="none"), grad_seed=1)


def _check_forward_and_gradients(inputs, layout, kw, grad_seed, launch=None):
    """Kernel vs fp32 reference: the output, then the gradients of q, k, v and the alpha logit."""
    q, k, v, rq, rk, al = inputs
    qk, kk, vk, ak = _leaf(q, k, v, al)
    out = _run_kernel(qk, kk, vk, rq, rk, ak, layout, launch=launch, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    qr, kr, vr, ar = _leaf(q, k, v, al, dtype=torch.float32)
    ref = _run_reference(qr, kr, vr, rq, rk, ar, layout, **kw)
    assert rel_l2(out, ref) <= TOL, rel_l2(out, ref)

    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(DEVICE, out.dtype)
    grads = torch.autograd.grad(out, (qk, kk, vk, ak), go)
    grads_ref = torch.autograd.grad(ref, (qr, kr, vr, ar), go.float())
    for name, g, gr in zip("q k v alpha".split(), grads, grads_ref):
        assert g.shape == gr.shape
        assert torch.isfinite(g).all(), name
        assert rel_l2(g, gr) <= max(TOL, 1e-2 if DTYPE != torch.float32 else 1e-4), (name, rel_l2(g, gr))


# 16-bit paths: bf16 on the GPU; fp16 under the interpreter (its bf16 dots are wrong)
HALF = torch.bfloat16 if HAS_CUDA else torch.float16


@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=str)
def test_all_blocks_selected_gives_the_sparse_branch_alone(dtype):
    """topk 1: every row selects every key block, so O = O_s = full softmax attention whatever alpha is, the
    linear branch is exactly zero and alpha gets no gradient; O and the gradients of q, k, v against an fp64
    autograd oracle, on fresh random inputs."""
    b, h, n = SIZES[0]
    seed = int(torch.randint(1 << 30, ()))
    q, k, v, rq, rk, al = _inputs(b, h, n, 64, "bhnd", dtype=dtype, seed=seed)
    o, lut, _, inv_den, *_ = _forward_outputs(q, k, v, rq, rk, al, 1.0, 64, 64, "none", "bhnd")
    assert lut.shape[-1] == -(-n // 64)
    assert inv_den.abs().max().item() == 0.0
    oracle = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    full = torch.softmax(oracle[0] @ oracle[1].transpose(-1, -2) / math.sqrt(64), dim=-1) @ oracle[2]
    # fp32 dots are exact under the interpreter and TF32 (10-bit mantissa) on the GPU
    tol = (5e-3 if HAS_CUDA else 1e-5) if dtype == torch.float32 else 1e-2
    assert rel_l2(o, full) <= tol, (seed, rel_l2(o, full))

    qk, kk, vk, ak = _leaf(q, k, v, al)
    out = _run_kernel(qk, kk, vk, rq, rk, ak, "bhnd", topk=1.0, block_q=64, block_k=64, quant="none")
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, (qk, kk, vk, ak), go)
    want = torch.autograd.grad(full, oracle, go.double())
    grad_tol = (5e-3 if HAS_CUDA else 1e-4) if dtype == torch.float32 else 2e-2  # TF32 on the GPU, as above
    for name, g, gr in zip("qkv", grads, want):
        assert rel_l2(g, gr) <= grad_tol, (seed, name, rel_l2(g, gr))
    assert torch.count_nonzero(grads[3]) == 0


def test_router_lut_matches_reference_router():
    b, h, n = SIZES[1]
    q, k, v, rq, rk, al = _inputs(b, h, n, 64, "bhnd", seed=5)
    _, lut, *_ = _forward_outputs(q, k, v, rq, rk, al, 0.3, 128, 64, "none", "bhnd")
    scores = reference.router_scores(q, k, rq, rk, 128, 64)
    n_sel = reference.topk_count(0.3, reference.block_count(n, 64))
    want = reference.mask_to_lut(reference.hard_topk_mask(scores, n_sel))
    assert torch.equal(lut.cpu(), want.cpu())


@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
def test_router_lut_matches_fp64_top_k_over_several_programs(weights_dtype):
    """Many query and key blocks per (batch, head), neither a multiple of the router's rows per program, two
    batches of three heads with their own projections: the LUT holds each row's best blocks by fp64 scores."""
    g = torch.Generator().manual_seed(11)
    b, h, nq, nk, d, n_sel, n = 2, 3, 37, 70, 64, 9, 500
    q_mean, k_mean = torch.randn(b, h, nq, d, generator=g), torch.randn(b, h, nk, d, generator=g)
    k_sum = torch.randn(b, h, d, generator=g) * n
    rq, rk = (torch.randn(h, d, d, generator=g).to(weights_dtype) for _ in range(2))
    lut = S.router_lut(q_mean.to(DEVICE), k_mean.to(DEVICE), k_sum.to(DEVICE), n, rq.to(DEVICE), rk.to(DEVICE),
                       n_sel).cpu()
    k_proj = torch.einsum("bhkd,hde->bhke", k_mean.double() - k_sum.double().unsqueeze(2) / n, rk.double())
    scores = torch.einsum("bhqd,hde,bhke->bhqk", q_mean.double(), rq.double(), k_proj)
    top = torch.topk(scores, n_sel + 1, dim=-1).values
    gap = (top[..., -2] - top[..., -1]) / scores.abs().amax(dim=-1)
    assert gap.min() > 1e-5  # no near-tie at the cut that fp32 rounding could flip: the data is fit to compare on
    want = torch.topk(scores, n_sel, dim=-1).indices.sort(dim=-1).values.int()
    assert torch.equal(lut, want)


def _route_scores(rows: torch.Tensor, n_sel: int, kept=(0, 0)) -> torch.Tensor:
    """The router launches on given block scores ``rows`` (R, nk): query block r is the one-hot e_r and key
    block j holds rows[:, j] in its first R channels, so with identity projections and no token mean every
    score is exactly ``rows``'s; returns the (R, n_sel) LUT."""
    r, nk = rows.shape
    d = 64
    k_mean = torch.zeros(1, 1, nk, d)
    k_mean[0, 0, :, :r] = rows.T
    eye = torch.eye(d).view(1, d, d).to(DEVICE)
    lut = S.router_lut(torch.eye(r, d).view(1, 1, r, d).to(DEVICE), k_mean.to(DEVICE),
                       torch.zeros(1, 1, d, device=DEVICE), 1, eye, eye, n_sel, kept)
    return lut.view(r, n_sel).cpu()


@pytest.mark.parametrize("nk,n_sel", [(9, 1), (9, 4), (9, 9), (300, 37), (512, 15), (1100, 40)])
def test_router_top_k_matches_torch_topk_with_ties_and_negatives(nk, n_sel):
    """The router's bisection top-k picks the same blocks as torch.topk, in ascending order, including rows
    with negative scores, signed zeros, large magnitudes and exact ties (lowest index wins a tie)."""
    g = torch.Generator().manual_seed(nk * 31 + n_sel)
    rows = torch.randn(6, nk, generator=g) * torch.tensor([1e-3, 1.0, 1e4, 1.0, 1.0, 1.0]).view(-1, 1)
    rows[3] = -rows[3].abs()  # all negative
    rows[4, : nk // 2] = 0.0
    rows[4, nk // 2 :] = -0.0  # zeros only: the first n_sel indices win
    rows[5] = torch.round(rows[5] * 2) / 2  # many exact ties
    lut = _route_scores(rows, n_sel)
    for r in range(6):
        got = lut[r].tolist()
        assert got == sorted(got) and len(set(got)) == n_sel, (r, got)
        x = rows[r]
        kth = torch.topk(x, n_sel).values[-1]
        above = set(torch.nonzero(x > kth).flatten().tolist())
        assert above <= set(got), (r, got)
        ties = [i for i in torch.nonzero(x == kth).flatten().tolist()][: n_sel - len(above)]
        assert set(got) == above | set(ties), (r, got)


@pytest.mark.parametrize("nk,n_sel,kept", [(9, 5, (2, 5)), (9, 3, (0, 3)), (9, 9, (0, 9)), (300, 40, (291, 300)),
                                           (64, 20, (10, 11))])
def test_router_always_kept_range(nk, n_sel, kept):
    """Blocks of the always-kept range are in every row whatever their scores (set to the row's lowest here),
    and the other slots go to the best of the remaining blocks, as torch.topk ranks them."""
    g = torch.Generator().manual_seed(nk + n_sel)
    rows = torch.randn(4, nk, generator=g)
    rows[:, kept[0]:kept[1]] = rows.min() - 1.0
    rows[3] = torch.round(rows[3])  # ties among the routed blocks too
    lut = _route_scores(rows, n_sel, kept)
    others = [j for j in range(nk) if not kept[0] <= j < kept[1]]
    for r in range(4):
        got = lut[r].tolist()
        assert got == sorted(got) and len(set(got)) == n_sel, (r, got)
        routed = sorted(others, key=lambda j: (-rows[r, j].item(), j))[: n_sel - (kept[1] - kept[0])]
        assert set(got) == set(range(*kept)) | set(routed), (r, got)


@pytest.mark.parametrize("kept,bq,layout", [((3, 4), 64, "bnhd"), ((0, 2), 128, "bhnd"), ((1, 4), 128, "bnhd")])
def test_always_kept_forward_backward_matches_reference(kept, bq, layout):
    """Joint attention's text range: the kernel's LUT holds it in every row and the forward and every
    gradient match the reference with the same range."""
    b, h, n = SIZES[0]
    inputs = _inputs(b, h, n, 64, layout, seed=61 + bq)
    kw = dict(topk=0.25, block_q=bq, block_k=64, quant="none", always_kept=kept)
    _check_forward_and_gradients(inputs, layout, kw, grad_seed=5)
    _, lut, *_ = _forward_outputs(*inputs, 0.25, bq, 64, "none", layout, kept)
    nk = reference.block_count(n, 64)
    assert lut.shape[-1] == (kept[1] - kept[0]) + reference.topk_count(0.25, nk - (kept[1] - kept[0]))
    for j in range(*kept):
        assert (lut == j).any(dim=-1).all()


def test_forward_under_bf16_autocast():
    """Stage 2 runs the op under bf16 autocast: the router must still rank in fp32 (a bf16 score tensor
    reached the top-k kernel on the first 2-GPU run and failed to compile)."""
    b, h, n = SIZES[0]
    q, k, v, rq, rk, al = _inputs(b, h, n, 64, "bnhd", seed=31)
    with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16):
        out = _run_kernel(q, k, v, rq, rk, al, "bnhd", topk=0.3)
    want = _run_kernel(q, k, v, rq, rk, al, "bnhd", topk=0.3)
    assert torch.equal(out, want)


@pytest.mark.skipif(not HAS_CUDA, reason="host/device syncs exist only on a GPU")
def test_forward_backward_never_sync_with_the_host():
    """A sync per call (e.g. torch.bincount reading its max back) drains the launch queue of every layer in
    eager training; the op must stay asynchronous."""
    b, h, n = SIZES[0]
    q, k, v, rq, rk, al = _inputs(b, h, n, 64, "bnhd", seed=37)
    qk, kk, vk, ak = _leaf(q, k, v, al)
    out = _run_kernel(qk, kk, vk, rq, rk, ak, "bnhd", topk=0.3)  # warm-up: compiles outside the check
    out.float().sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = _run_kernel(qk, kk, vk, rq, rk, ak, "bnhd", topk=0.3)
        out.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("changes,block_q", [({"tile_m_fwd": 64}, 128), ({"tile_m_bwd": 128}, 128)])
def test_launch_settings_change_the_tiling_not_the_result(changes, block_q):
    """A LaunchConfig passed to the op reaches its launches: 64-row forward tiles inside 128-query routing
    blocks (two programs per block share its linear state), or 128-row backward tiles; forward and every
    gradient still match the reference."""
    b, h, n = SIZES[1]
    inputs = _inputs(b, h, n, 64, "bnhd", seed=53)
    launch = dataclasses.replace(DEFAULT_LAUNCH, **changes)
    kw = dict(topk=0.3, block_q=block_q, block_k=64, quant="none")
    _check_forward_and_gradients(inputs, "bnhd", kw, grad_seed=3, launch=launch)


def test_launch_config_is_checked_and_round_trips_through_the_op_arguments():
    launch = dataclasses.replace(DEFAULT_LAUNCH, lin_stages=4, tile_m_fwd=64, sparse_ws=1)
    assert LaunchConfig.from_ints(launch.as_ints()) == launch
    with pytest.raises(ValueError, match="sparse_ws"):
        dataclasses.replace(DEFAULT_LAUNCH, sparse_ws=2)
    with pytest.raises(ValueError, match="tile_m_fwd"):
        dataclasses.replace(DEFAULT_LAUNCH, tile_m_fwd=96)
    with pytest.raises(ValueError, match="num_warps"):
        dataclasses.replace(DEFAULT_LAUNCH, num_warps=3)
    with pytest.raises(TypeError):
        dataclasses.replace(DEFAULT_LAUNCH, lin_state=False)  # a removed variant is an unknown field


def test_inverted_index():
    g = torch.Generator().manual_seed(0)
    b, h, nq, nk, n_sel, bq = 2, 3, 5, 9, 4, 128
    n = (nq - 1) * bq + 70
    lut = torch.stack([torch.randperm(nk, generator=g)[:n_sel].sort().values for _ in range(b * h * nq)])
    lut = lut.view(b, h, nq, n_sel).to(torch.int32)
    offsets, tiles = S.inverted_index(lut, n, bq, nk, 64)
    nt = -(-n // 64)
    for bh in range(b * h):
        for j in range(nk):
            got = tiles[offsets[bh * nk + j] : offsets[bh * nk + j + 1]].tolist()
            want = [t for t in range(nt) if j in lut.view(b * h, nq, n_sel)[bh, (t * 64) // bq].tolist()]
            assert got == want


# --------------------------------------------------------------------------------------------------
# independent dense fp64 oracle (explicit N x N masked softmax + masked linear attention)
# --------------------------------------------------------------------------------------------------


def _dense_fp64(q, k, v, mask_tok, alpha_logit):
    """DESIGN section 1 on (B, H, N, D) with a token-level boolean mask (B, H, N, N), in fp64."""
    q, k, v = q.double(), k.double(), v.double()
    d = q.shape[-1]
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    s = s.masked_fill(~mask_tok, float("-inf"))
    o_s = torch.softmax(s, dim=-1) @ v
    pq, pk = torch.softmax(q, dim=-1), torch.softmax(k, dim=-1)
    kern = (pq @ pk.transpose(-1, -2)) * (~mask_tok)
    o_l = (kern @ v) / (kern.sum(-1, keepdim=True) + 1e-6)
    a = torch.sigmoid(alpha_logit.double()).view(1, -1, 1, 1)
    a = torch.where(mask_tok.all(dim=-1, keepdim=True), torch.ones_like(a), a)  # nothing left for O_l
    return a * o_s + (1 - a) * o_l


@pytest.mark.parametrize("topk,bq,kept", [(0.25, 128, (0, 0)), (0.6, 64, (0, 0)), (0.25, 64, (4, 6))])
def test_forward_against_dense_fp64(topk, bq, kept):
    b, h, n = SIZES[1]
    q, k, v, rq, rk, al = _inputs(b, h, n, 64, "bhnd", seed=11)
    out, lut, *_ = _forward_outputs(q, k, v, rq, rk, al, topk, bq, 64, "none", "bhnd", kept)
    nk = reference.block_count(n, 64)
    blk = reference.lut_to_mask(lut, nk)
    mask_tok = blk.repeat_interleave(bq, dim=2)[:, :, :n].repeat_interleave(64, dim=3)[..., :n]
    want = _dense_fp64(q, k, v, mask_tok, al)
    assert rel_l2(out, want) <= (1e-5 if DTYPE == torch.float32 else 1e-2)


# --------------------------------------------------------------------------------------------------
# Hedgehog features and alpha per query, against an independent fp64 oracle
# --------------------------------------------------------------------------------------------------


def _fp64_linear_options(q, k, v, blocks, alpha_logit, block_q, block_k, feature_q=None, feature_k=None,
                         mixing="head", linear_keys="unselected", alpha_weight=None):
    """SLA2 on (B, H, N, D) in fp64 from the block selection ``blocks`` (B, H, nq, nk) bool, with Hedgehog
    features [softmax(x W), softmax(-x W)] when weights are given and alpha per head or, with
    ``mixing="query"``, per row: sigmoid(LSE_sel - LSE_tail + alpha_logit) with LSE_tail over the unselected
    blocks of q . kbar_j / sqrt(d) + ln n_j (both detached), or with ``mixing="query-linear"``
    sigmoid(q . alpha_weight_h / sqrt(d) + alpha_logit).  Returns (O, alpha per row)."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, n, d = q.shape
    nk = blocks.shape[-1]
    row_blocks = blocks.repeat_interleave(block_q, dim=2)[:, :, :n]  # (B, H, N, nk)
    mask = row_blocks.repeat_interleave(block_k, dim=3)[..., :n]
    s_sel = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, float("-inf"))
    o_s = torch.softmax(s_sel, dim=-1) @ v

    def feats(x, w):
        if w is None:
            return torch.softmax(x, dim=-1)
        proj = torch.einsum("bhnd,hde->bhne", x, w.double())
        return torch.cat([torch.softmax(proj, dim=-1), torch.softmax(-proj, dim=-1)], dim=-1)

    kern = feats(q, feature_q) @ feats(k, feature_k).transpose(-1, -2)
    if linear_keys == "unselected":  # else every key, the selected ones too
        kern = kern * (~mask)
    o_l = (kern @ v) / (kern.sum(-1, keepdim=True) + 1e-6)
    logit = alpha_logit.double().view(1, h, 1, 1)
    if mixing == "query":
        with torch.no_grad():
            counts = (n - torch.arange(nk, dtype=torch.float64, device=q.device) * block_k).clamp(max=block_k)
            padded = torch.nn.functional.pad(k, (0, 0, 0, nk * block_k - n))
            k_bar = padded.view(b, h, nk, block_k, d).sum(dim=3) / counts.view(-1, 1)
            tail = q @ k_bar.transpose(-1, -2) / math.sqrt(d) + counts.log()
            lse_tail = torch.logsumexp(tail.masked_fill(row_blocks, float("-inf")), dim=-1, keepdim=True)
            mass_ratio = torch.logsumexp(s_sel, dim=-1, keepdim=True) - lse_tail
        logit = logit + mass_ratio
    elif mixing == "query-linear":
        logit = logit + (q @ alpha_weight.double().unsqueeze(-1)) / math.sqrt(d)
    alpha = torch.where(mask.all(dim=-1, keepdim=True), torch.ones_like(logit), torch.sigmoid(logit))
    return alpha * o_s + (1 - alpha) * o_l, alpha.expand(b, h, n, 1)[..., 0]


def _linear_option_inputs(n, d, block_q, topk, layout, dtype, hedgehog, seed):
    """Fresh inputs, Hedgehog weights (or None) and the reference router's block selection."""
    b, h = 1, 2
    q, k, v, rq, rk, al = _inputs(b, h, n, d, layout, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    weights = [(0.3 * torch.randn(h, d, d // 2, generator=g)).to(DEVICE) for _ in range(2)] if hedgehog else [None] * 2
    qh, kh = _to_bhnd(q, layout).float(), _to_bhnd(k, layout).float()
    blocks = reference.selection_mask(reference.router_scores(qh, kh, rq, rk, block_q, 64), topk)
    return (q, k, v, rq, rk, al), weights, blocks


LINEAR_OPTION_CASES = [
    # (layout, N, D, block_q, topk, mixing, hedgehog, linear_keys)
    ("bnhd", 333, 64, 128, 0.3, "head", True, "unselected"),
    ("bhnd", 200, 128, 64, 0.5, "query", False, "unselected"),
    ("bnhd", 333, 64, 64, 0.2, "query", True, "unselected"),
    ("bhnd", 200, 64, 64, 1.0, "query", True, "unselected"),  # every block selected: alpha 1, no alpha gradient
    ("bnhd", 333, 64, 128, 0.3, "head", False, "all"),
    ("bhnd", 333, 128, 64, 0.2, "query", True, "all"),
]


@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=str)
@pytest.mark.parametrize("case", LINEAR_OPTION_CASES, ids=lambda c: "-".join(map(str, c)))
def test_linear_branch_options_forward_backward_match_fp64(case, dtype):
    """Hedgehog features, alpha per query and the linear branch over every key block: O and the gradients of
    q, k, v, the alpha logit and both Hedgehog weights against fp64 autograd."""
    layout, n, d, block_q, topk, mixing, hedgehog, linear_keys = case
    if dtype != torch.float32 and not (hedgehog and mixing == "query"):
        pytest.skip("16 bits: one case with both options keeps the interpreter time small")
    seed = int(torch.randint(1 << 30, ()))
    inputs, weights, blocks = _linear_option_inputs(n, d, block_q, topk, layout, dtype, hedgehog, seed)
    q, k, v, rq, rk, al = inputs
    leaves = _leaf(q, k, v, al) + [w.clone().requires_grad_(True) for w in weights if w is not None]
    feats = leaves[4:] if hedgehog else [None, None]
    out = S.sla2_attention_triton(*leaves[:3], rq, rk, leaves[3], AttentionSpec(topk, block_q, 64), layout=layout,
                                  feature_q=feats[0], feature_k=feats[1], mixing=mixing, linear_keys=linear_keys)
    oracle = [t.detach().double().requires_grad_(True) for t in leaves]
    want, _ = _fp64_linear_options(*(_to_bhnd(t, layout) for t in oracle[:3]), blocks, oracle[3], block_q, 64,
                                   *(oracle[4:] if hedgehog else []), mixing=mixing, linear_keys=linear_keys)
    want = _to_bhnd(want, layout)
    out_tol, grad_tol = (1e-5, 1e-4) if dtype == torch.float32 and not HAS_CUDA else (1e-2, 2e-2)
    assert rel_l2(out, want) <= out_tol, (seed, rel_l2(out, want))
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, leaves, go)
    grads_want = torch.autograd.grad(want, oracle, go.double())
    for name, g, gw in zip("q k v alpha_logit feature_q feature_k".split(), grads, grads_want):
        assert g.shape == gw.shape and torch.isfinite(g).all(), name
        if topk == 1.0 and name == "alpha_logit":
            assert torch.count_nonzero(g) == 0
            continue
        assert rel_l2(g, gw) <= grad_tol, (seed, name, rel_l2(g, gw))


@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=str)
@pytest.mark.parametrize("layout,n,d,block_q,topk,hedgehog,linear_keys", [
    ("bnhd", 333, 64, 128, 0.3, False, "unselected"), ("bhnd", 200, 128, 64, 0.2, True, "all"),
    ("bhnd", 200, 64, 64, 1.0, False, "unselected")])
def test_query_linear_mixing_forward_backward_match_fp64(layout, n, d, block_q, topk, hedgehog, linear_keys, dtype):
    """mixing="query-linear": the rows' alpha logits q . w_h / sqrt(d) + a_h formed by the Q pre-pass, read per
    row by the sparse launch, their gradient per row from the backward's row pass and taken on to q, w and a:
    O and the gradients of q, k, v, the alpha logit, the query weight (and the Hedgehog weights) against fp64
    autograd."""
    if dtype != torch.float32 and not hedgehog:
        pytest.skip("16 bits: the Hedgehog case keeps the interpreter time small")
    seed = int(torch.randint(1 << 30, ()))
    inputs, weights, blocks = _linear_option_inputs(n, d, block_q, topk, layout, dtype, hedgehog, seed)
    q, k, v, rq, rk, al = inputs
    g = torch.Generator().manual_seed(seed + 2)
    alpha_weight = torch.randn(2, d, generator=g).to(DEVICE)
    leaves = _leaf(q, k, v, al) + [alpha_weight.clone().requires_grad_(True)]
    leaves += [w.clone().requires_grad_(True) for w in weights if w is not None]
    feats = leaves[5:] if hedgehog else [None, None]
    out = S.sla2_attention_triton(*leaves[:3], rq, rk, leaves[3], AttentionSpec(topk, block_q, 64), layout=layout,
                                  feature_q=feats[0], feature_k=feats[1], mixing="query-linear",
                                  linear_keys=linear_keys, alpha_weight=leaves[4])
    oracle = [t.detach().double().requires_grad_(True) for t in leaves]
    want, _ = _fp64_linear_options(*(_to_bhnd(t, layout) for t in oracle[:3]), blocks, oracle[3], block_q, 64,
                                   *(oracle[5:] if hedgehog else []), mixing="query-linear", linear_keys=linear_keys,
                                   alpha_weight=oracle[4])
    want = _to_bhnd(want, layout)
    out_tol, grad_tol = (1e-5, 1e-4) if dtype == torch.float32 and not HAS_CUDA else (1e-2, 2e-2)
    assert rel_l2(out, want) <= out_tol, (seed, rel_l2(out, want))
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, leaves, go)
    grads_want = torch.autograd.grad(want, oracle, go.double(), allow_unused=True, materialize_grads=True)
    for name, got, gw in zip("q k v alpha_logit alpha_weight feature_q feature_k".split(), grads, grads_want):
        assert got.shape == gw.shape and torch.isfinite(got).all(), name
        if topk == 1.0 and name in ("alpha_logit", "alpha_weight"):  # no linear branch: alpha has no effect
            assert torch.count_nonzero(got) == 0, name
            continue
        assert rel_l2(got, gw) <= grad_tol, (seed, name, rel_l2(got, gw))


@pytest.mark.parametrize("quant,dtype,key_mean", [("none", DTYPE, 2.0), ("int8", DTYPE, 2.0), ("none", HALF, 16.0),
                                                   ("int8", HALF, 16.0)], ids=str)
def test_query_mixing_alpha_per_row_matches_fp64(quant, dtype, key_mean):
    """The forward's alpha per row (LSE_sel from the sparse loop, LSE_tail from the block means) itself; in
    the low-bit modes LSE_sel comes from the INT8 logits of K - mean(K), and LSE_tail is shifted to match.
    Keys with a large common mean in 16 bits: the tail's block means are centred before they are rounded
    (uncentred, fp16 block means near 16 put alpha 1e-3 off, bf16 ones near 2 as far).  The oracle takes the
    kernel's own selection: shifted keys rounded to 16 bits (bf16 steps of 1/8 near 16) can flip the router's
    near-ties, and a different block moves a whole query block's alpha; the router is tested on its own."""
    n, d, block_q, topk = 333, 64, 128, 0.3
    seed = int(torch.randint(1 << 30, ()))
    (q, k, v, rq, rk, al), _, _ = _linear_option_inputs(n, d, block_q, topk, "bhnd", dtype, False, seed)
    k = k + key_mean  # the shift moves LSE_sel by several units
    _, lut, *_, alpha_rows = S.sla2_fwd(q, k, v, rq, rk, al, topk, block_q, 64, quant, 0, 0, "bhnd", True,
                                        DEFAULT_LAUNCH.as_ints(), None, None, "query")
    blocks = reference.lut_to_mask(lut, reference.block_count(n, 64))
    assert (blocks.sum(-1) == lut.shape[-1]).all()  # n_sel distinct blocks per query block
    _, want = _fp64_linear_options(q, k, v, blocks, al, block_q, 64, mixing="query")
    assert alpha_rows.shape == (2, n)
    assert (want.std(dim=-1) > 0.01).all()  # alpha differs between rows
    exact = dtype == torch.float32 and not HAS_CUDA and quant == "none"
    # 16-bit products are exact and summed in fp32; int8 logits move LSE_sel by a few hundredths
    tol = 1e-5 if exact else 5e-4 if quant == "none" else 2e-2
    err = (alpha_rows.double() - want.reshape(2, n)).abs()
    worst = int(err.argmax())
    assert err.max().item() <= tol, (f"seed {seed}: max |alpha error| {err.max().item():.4f} at (head, row) "
                                     f"{divmod(worst, n)}, got {alpha_rows.flatten()[worst].item():.4f}")


class _LaunchRecorder:
    """Stands in for a Triton kernel and logs its name at every launch (``kernel[grid](...)``)."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
@pytest.mark.parametrize("quant,hedgehog", [("none", False), ("none", True), ("int8-fp8", False)])
def test_key_pass_matches_the_two_key_launches(layout, quant, hedgehog, monkeypatch):
    """LaunchConfig.key_pass (the key statistics in one launch, phi(K) never written) against k_feats +
    kv_outer, with the linear branch over every key block: the same LUT, H_all, z_all and 1/den, and the same
    O (to reduction order; in ``int8-fp8`` also to the INT8 rounding of K - mean(K), whose mean is summed in
    another order), at a ragged N; and O against the fp64 oracle."""
    launched = []
    for name in ("k_feats", "kv_outer", "key_pass"):
        monkeypatch.setattr(forward_kernels, name, _LaunchRecorder(getattr(forward_kernels, name), name, launched))
    n, d = (4001, 128) if HAS_CUDA else (333, 64)
    seed = int(torch.randint(1 << 30, ()))
    (q, k, v, rq, rk, al), weights, blocks = _linear_option_inputs(n, d, 64, 0.2, layout, DTYPE, hedgehog, seed)
    signed = [signed_weights(w, 2, d, DTYPE) if hedgehog else None for w in weights]
    args = (q, k, v, rq, rk, al, 0.2, 64, 64, quant, 0, 0, layout, True)
    two = S.sla2_fwd(*args, DEFAULT_LAUNCH.as_ints(), *signed, "head", "all", None)
    assert launched == ["k_feats", "kv_outer"], launched
    launched.clear()
    one = S.sla2_fwd(*args, dataclasses.replace(DEFAULT_LAUNCH, key_pass=1).as_ints(), *signed, "head", "all", None)
    assert launched == ["key_pass"], launched
    assert torch.equal(two[1], one[1]), seed  # the same block means route the same blocks
    for name, i in (("H_all", 4), ("z_all", 5), ("1/den", 3)):
        assert rel_l2(one[i], two[i]) <= 1e-5, (seed, name, rel_l2(one[i], two[i]))
    o_tol = 1e-3 if quant != "none" else (1e-6 if DTYPE == torch.float32 else 1e-3)
    assert rel_l2(one[0], two[0]) <= o_tol, (seed, rel_l2(one[0], two[0]))
    want, _ = _fp64_linear_options(*(_to_bhnd(t, layout) for t in (q, k, v)), blocks, al, 64, 64, *weights,
                                   linear_keys="all")
    oracle_tol = 5e-2 if quant != "none" else (1e-5 if DTYPE == torch.float32 else 1e-2)
    assert rel_l2(one[0], _to_bhnd(want, layout)) <= oracle_tol, (seed, rel_l2(one[0], _to_bhnd(want, layout)))


@pytest.mark.parametrize("quant", ["int8", "int8-fp8"])
def test_lowbit_forward_with_hedgehog_and_query_mixing(quant):
    """The low-bit forwards with both options: within the quantisation error of the fp64 oracle."""
    layout, n, d, block_q, topk = "bnhd", 333, 64, 128, 0.3
    seed = int(torch.randint(1 << 30, ()))
    (q, k, v, rq, rk, al), (wq, wk), blocks = _linear_option_inputs(n, d, block_q, topk, layout, DTYPE, True, seed)
    out = S.sla2_attention_triton(q, k, v, rq, rk, al, AttentionSpec(topk, block_q, 64, quant), layout=layout,
                                  feature_q=wq, feature_k=wk, mixing="query")
    want, _ = _fp64_linear_options(*(_to_bhnd(t, layout) for t in (q, k, v)), blocks, al, block_q, 64, wq, wk,
                                   mixing="query")
    want = _to_bhnd(want, layout)
    cos = torch.nn.functional.cosine_similarity(out.double().flatten(), want.flatten(), dim=0).item()
    assert rel_l2(out, want) <= 5e-2 and cos >= 0.999, (seed, rel_l2(out, want), cos)


@pytest.mark.skipif(not HAS_CUDA, reason="realistic size: GPU only")
def test_hedgehog_and_query_mixing_at_realistic_size():
    """bf16 at (1, 4, 8190, 128), 97%: forward and gradients against the fp64 oracle on the GPU."""
    n, d, block_q, topk = 8190, 128, 128, 0.03
    inputs, weights, blocks = _linear_option_inputs(n, d, block_q, topk, "bnhd", torch.bfloat16, True, 41)
    q, k, v, rq, rk, al = inputs
    leaves = _leaf(q, k, v, al) + [w.clone().requires_grad_(True) for w in weights]
    out = S.sla2_attention_triton(*leaves[:3], rq, rk, leaves[3], AttentionSpec(topk, block_q, 64), layout="bnhd",
                                  feature_q=leaves[4], feature_k=leaves[5], mixing="query")
    oracle = [t.detach().double().requires_grad_(True) for t in leaves]
    want, _ = _fp64_linear_options(*(_to_bhnd(t, "bnhd") for t in oracle[:3]), blocks, oracle[3], block_q, 64,
                                   *oracle[4:], mixing="query")
    want = _to_bhnd(want, "bnhd")
    assert rel_l2(out, want) <= 1e-2, rel_l2(out, want)
    go = torch.randn_like(out)
    for name, g, gw in zip("q k v alpha_logit feature_q feature_k".split(), torch.autograd.grad(out, leaves, go),
                           torch.autograd.grad(want, oracle, go.double())):
        assert rel_l2(g, gw) <= 2e-2, (name, rel_l2(g, gw))


def test_linear_options_are_checked():
    q = torch.randn(1, 2, 100, 64, device=DEVICE, dtype=DTYPE)
    rq = torch.eye(64).repeat(2, 1, 1).to(DEVICE)
    al, w = torch.zeros(2, device=DEVICE), torch.zeros(2, 64, 32, device=DEVICE)
    spec = AttentionSpec(0.3)
    with pytest.raises(ValueError, match="mixing must be one of"):
        S.sla2_attention_triton(q, q, q, rq, rq, al, spec, layout="bhnd", mixing="block")
    with pytest.raises(ValueError, match="together"):
        S.sla2_attention_triton(q, q, q, rq, rq, al, spec, layout="bhnd", feature_q=w)
    with pytest.raises(ValueError, match=r"\(H, D, D/2\)"):
        S.sla2_attention_triton(q, q, q, rq, rq, al, spec, layout="bhnd", feature_q=w[..., :16], feature_k=w)
    for options in (dict(mixing="query"), dict(feature_q=w, feature_k=w), dict(linear_keys="all")):
        with pytest.raises(ValueError, match="warp-specialized sparse launch computes softmax features"):
            S.sla2_attention_triton(q, q, q, rq, rq, al, spec, layout="bhnd", launch=WS_LAUNCH, **options)
    with pytest.raises(ValueError, match="linear_keys must be one of"):
        S.sla2_attention_triton(q, q, q, rq, rq, al, spec, layout="bhnd", linear_keys="selected")


def test_default_launch_runs_the_linear_options_where_gluon_applies(monkeypatch):
    """The default launch (sparse_gluon=2) with Hedgehog features, alpha per query or the linear branch over every
    key block: on a Hopper GPU the Gluon launch (sparse_gluon=1's outputs, bit for bit), elsewhere the plain
    launch (sparse_gluon=0's, bit for bit)."""
    launched = []
    real = gluon_kernels.launch_sparse_gluon
    monkeypatch.setattr(gluon_kernels, "launch_sparse_gluon", lambda *a, **kw: launched.append(1) or real(*a, **kw))
    (q, k, v, rq, rk, al), (wq, wk), _ = _linear_option_inputs(200, 64, 128, 0.3, "bnhd", WS_DTYPE, True, 7)
    for (feature_q, feature_k), mixing, linear_keys in (((wq, wk), "head", "unselected"),
                                                        ((None, None), "query", "unselected"),
                                                        ((None, None), "head", "all"),
                                                        ((wq, wk), "query", "all")):
        outs = []
        for launch in (DEFAULT_LAUNCH, GLUON_LAUNCH if IS_HOPPER else PLAIN_LAUNCH):
            launched.clear()
            outs.append(S.sla2_attention_triton(q, k, v, rq, rk, al, AttentionSpec(0.3), layout="bnhd",
                                                launch=launch, feature_q=feature_q, feature_k=feature_k,
                                                mixing=mixing, linear_keys=linear_keys))
            assert len(launched) == int(IS_HOPPER), (mixing, linear_keys, launch)
        assert torch.equal(*outs), (mixing, linear_keys)


# --------------------------------------------------------------------------------------------------
# the warp-specialized sparse launch (LaunchConfig.sparse_ws)
# --------------------------------------------------------------------------------------------------

WS_LAUNCH = dataclasses.replace(DEFAULT_LAUNCH, sparse_ws=1)
WS_DTYPE = torch.bfloat16 if HAS_CUDA else torch.float16  # 16-bit only; the interpreter's bf16 dot is wrong


def _plain_and_ws_forward(q, k, v, rq, rk, al, topk, block_q, layout, launch=PLAIN_LAUNCH):
    """The forward op's outputs (O, LUT, LSE, 1/den, ...) with the plain and the warp-specialized sparse launch."""
    args = (q, k, v, rq, rk, al, topk, block_q, 64, "none", 0, 0, layout, True)
    return (S.sla2_fwd(*args, launch.as_ints()),
            S.sla2_fwd(*args, dataclasses.replace(launch, sparse_ws=1).as_ints()))


WS_WRONG_ON_GPU = pytest.mark.xfail(
    HAS_CUDA, strict=True,
    reason="on an H100 with Triton 3.6 the warp-specialized launch writes wrong or non-finite rows (right under "
           "the interpreter): a known defect, so the launch stays off by default and out of the product path")


@WS_WRONG_ON_GPU
@pytest.mark.parametrize("layout,d,block_q,topk,tile_m", [("bnhd", 128, 128, 0.3, 128), ("bhnd", 64, 64, 0.5, 128),
                                                        ("bnhd", 64, 128, 0.2, 64)])
def test_warp_specialized_sparse_launch_matches_the_plain_one(layout, d, block_q, topk, tile_m):
    """Two batches, ragged N, both layouts: the same O, LSE and 1/den as the plain sparse launch (bit for
    bit under the interpreter, which runs the same arithmetic in the same order), and O within 16-bit
    rounding of the fp32 reference."""
    b, h, n = (2, 3, 1337) if HAS_CUDA else (2, 2, 333)
    q, k, v, rq, rk, al = _inputs(b, h, n, d, layout, dtype=WS_DTYPE, seed=61 + d)
    plain, ws = _plain_and_ws_forward(q, k, v, rq, rk, al, topk, block_q, layout,
                                      dataclasses.replace(PLAIN_LAUNCH, tile_m_fwd=tile_m))
    assert torch.equal(plain[1], ws[1])  # the same LUT drives both
    for name, got, want, tol in (("O", ws[0], plain[0], 5e-3), ("LSE", ws[2], plain[2], 1e-5),
                                 ("1/den", ws[3], plain[3], 1e-5)):
        if HAS_CUDA:
            assert rel_l2(got, want) <= tol, (name, rel_l2(got, want))
        else:
            assert torch.equal(got, want), (name, (got.float() - want.float()).abs().max())
    ref = _run_reference(q.float(), k.float(), v.float(), rq, rk, al, layout, topk=topk, block_q=block_q, block_k=64)
    assert rel_l2(ws[0], ref) <= 1e-2, rel_l2(ws[0], ref)


@pytest.mark.skipif(not HAS_CUDA, reason="warp specialization and TMA need the GPU (compiled offline in "
                    "test_kernel_codegen.py)")
@WS_WRONG_ON_GPU
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_warp_specialized_sparse_launch_at_wan_size(layout):
    """Wan2.1-1.3B at 480p, (1, 12, 32760, 128) at 97% and 90% sparsity: the warp-specialized launch
    against the fp32 reference on a few query blocks (the first, the ragged last, two inside) and against
    the plain launch on every row."""
    b, h, n, d = 1, 12, 32760, 128
    q, k, v, rq, rk, al = _inputs(b, h, n, d, layout, dtype=torch.bfloat16, seed=71)
    q_blocks = torch.tensor([0, 37, 128, reference.block_count(n, 128) - 1], device=DEVICE)
    rows = (q_blocks.view(-1, 1) * 128 + torch.arange(128, device=DEVICE)).view(-1)
    rows = rows[rows < n]
    for topk in (0.03, 0.1):
        plain, ws = _plain_and_ws_forward(q, k, v, rq, rk, al, topk, 128, layout)
        assert rel_l2(ws[0], plain[0]) <= 5e-3 and rel_l2(ws[2], plain[2]) <= 1e-5, topk
        ref = reference.sla2_attention_reference(*(_to_bhnd(t, layout) for t in (q, k, v)), rq, rk, al, topk=topk,
                                                 q_blocks=q_blocks, chunk_q_blocks=2)
        assert rel_l2(_to_bhnd(ws[0], layout)[:, :, rows], ref) <= 1e-2, topk


def test_warp_specialized_sparse_launch_refuses_what_it_does_not_compute():
    b, h, n = SIZES[0]
    q, k, v, rq, rk, al = _inputs(b, h, n, 64, "bhnd", dtype=WS_DTYPE, seed=67)
    with pytest.raises(ValueError, match="quant='none' only"):
        _run_kernel(q, k, v, rq, rk, al, "bhnd", launch=WS_LAUNCH, topk=0.3, quant="int8")
    with pytest.raises(ValueError, match="dtypes"):
        _run_kernel(q.float(), k.float(), v.float(), rq, rk, al, "bhnd", launch=WS_LAUNCH, topk=0.3)


# --------------------------------------------------------------------------------------------------
# the Gluon sparse launch (LaunchConfig.sparse_gluon)
# --------------------------------------------------------------------------------------------------

GLUON_LAUNCH = dataclasses.replace(DEFAULT_LAUNCH, sparse_gluon=1)
IS_HOPPER = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not IS_HOPPER, reason="Gluon kernels need an sm_90 GPU (they do not run under the "
                                  "interpreter; test_kernel_codegen.py compiles them offline)")


def _mismatch(name, got, want, dims, tol):
    """Where ``got`` is furthest from ``want``: max |error| with its index (named by ``dims``; the token's
    128-row tile and warpgroup half too), the values there, the rel. L2 and which tiles and halves hold
    errors above ``tol``: enough to tell a ragged-tile, warpgroup or layout bug from a rounding drift."""
    got, want = got.double(), want.double()
    err = (got - want).abs().nan_to_num(float("inf"))
    flat = int(err.argmax())
    index = [int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape)]
    where = dict(zip(dims, index))
    token_dim = dims.index("token")
    bad_tokens = (err > tol).nonzero()[:, token_dim].unique()
    bad_tiles = sorted({int(t) // 128 for t in bad_tokens})
    bad_halves = sorted({int(t) % 128 // 64 for t in bad_tokens})
    return (f"{name}: max |err| {err.max().item():.3e} at {where} (tile {where['token'] // 128}, warpgroup "
            f"{where['token'] % 128 // 64}): got {got.flatten()[flat].item():.5g}, want {want.flatten()[flat].item():.5g}; "
            f"rel L2 {rel_l2(got, want):.2e}; {int((~torch.isfinite(got)).sum())} non-finite; tokens over {tol:g}: "
            f"{len(bad_tokens)} in tiles {bad_tiles[:8]}{'...' if len(bad_tiles) > 8 else ''}, warpgroups {bad_halves}")


def _check_gluon_against_plain(q, k, v, rq, rk, al, topk, layout, quant="none"):
    """The Gluon launch's O, LSE and 1/den against the plain sparse launch on every row (the same LUT and,
    for int8-fp8, the same INT8 / FP8 copies), with a message that says where they differ.  Returns the
    Gluon O."""
    args = (q, k, v, rq, rk, al, topk, 128, 64, quant, 0, 0, layout, True)
    plain = S.sla2_fwd(*args, PLAIN_LAUNCH.as_ints())
    gluon = S.sla2_fwd(*args, GLUON_LAUNCH.as_ints())
    assert torch.equal(plain[1], gluon[1])  # the same LUT drives both
    o_dims = ("batch", "token", "head", "channel") if layout == "bnhd" else ("batch", "head", "token", "channel")
    # O: bf16 outputs of the same math in a different order (1-2 ulp); LSE in log2 units; 1/den in fp32
    for name, got, want, dims, rel, tol in (("O", gluon[0], plain[0], o_dims, 5e-3, 3e-2),
                                            ("LSE", gluon[2], plain[2], ("batch*head", "token"), 1e-5, 1e-3),
                                            ("1/den", gluon[3], plain[3], ("batch*head", "token"), 1e-5, 1e-4)):
        assert rel_l2(got, want) <= rel and torch.isfinite(got).all(), _mismatch(name, got, want, dims, tol)
    return gluon[0]


@needs_hopper
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
@pytest.mark.parametrize("b,h,n,d", [(2, 3, 4096, 64), (2, 3, 4001, 64), (2, 3, 4096, 128), (2, 3, 4001, 128),
                                     (1, 12, 32760, 128)])
def test_gluon_sparse_launch_matches_plain_launch_and_reference(layout, b, h, n, d):
    """N = 4096, a ragged N and Wan2.1-1.3B at 480p (1, 12, 32760, 128); D = 64 and 128, both layouts, 90%
    and 97% sparsity: the Gluon launch against the plain sparse launch on every row and against the fp32
    reference on the first, two inner and the ragged last query block."""
    q, k, v, rq, rk, al = _inputs(b, h, n, d, layout, dtype=torch.bfloat16, seed=83 + d + n)
    nq = reference.block_count(n, 128)
    q_blocks = torch.tensor(sorted({0, min(37, nq - 2), nq // 2, nq - 1}), device=DEVICE)
    rows = (q_blocks.view(-1, 1) * 128 + torch.arange(128, device=DEVICE)).view(-1)
    rows = rows[rows < n]
    for topk in (0.1, 0.03):
        o = _check_gluon_against_plain(q, k, v, rq, rk, al, topk, layout)
        ref = reference.sla2_attention_reference(*(_to_bhnd(t.float(), layout) for t in (q, k, v)), rq, rk, al,
                                                 topk=topk, q_blocks=q_blocks, chunk_q_blocks=2)
        got = _to_bhnd(o, layout)[:, :, rows]
        assert rel_l2(got, ref) <= 1e-2, _mismatch(f"O vs reference, top-k {topk}", got, ref,
                                                   ("batch", "head", "token", "channel"), 5e-2)


@needs_hopper
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
@pytest.mark.parametrize("b,h,n", [(2, 3, 4001), (1, 12, 32760)])
def test_gluon_int8_fp8_matches_plain_launch_and_reference(layout, b, h, n):
    """quant="int8-fp8" (INT8 QK^T on the forward's INT8 Q and K - mean(K), FP8 PV on its FP8 V^T, P staged
    in shared memory): against the plain launch's int8-fp8 on every row (the same quantised operands: O to
    bf16 rounding, the LSE with its mean(K) correction, 1/den) and against the fp32 reference on four query
    blocks, within the low-bit error of the plain launch's own tests."""
    q, k, v, rq, rk, al = _inputs(b, h, n, 128, layout, dtype=torch.bfloat16, seed=7 + n)
    nq = reference.block_count(n, 128)
    q_blocks = torch.tensor(sorted({0, min(37, nq - 2), nq // 2, nq - 1}), device=DEVICE)
    rows = (q_blocks.view(-1, 1) * 128 + torch.arange(128, device=DEVICE)).view(-1)
    rows = rows[rows < n]
    for topk in (0.1, 0.03):
        o = _check_gluon_against_plain(q, k, v, rq, rk, al, topk, layout, quant="int8-fp8")
        ref = reference.sla2_attention_reference(*(_to_bhnd(t.float(), layout) for t in (q, k, v)), rq, rk, al,
                                                 topk=topk, q_blocks=q_blocks, chunk_q_blocks=2)
        got = _to_bhnd(o, layout)[:, :, rows]
        assert rel_l2(got, ref) <= 5e-2, _mismatch(f"O vs reference, top-k {topk}", got, ref,
                                                   ("batch", "head", "token", "channel"), 2e-1)


@needs_hopper
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
@pytest.mark.parametrize("quant", ["none", "int8-fp8"])
@pytest.mark.parametrize("hedgehog,mixing,linear_keys,query_features", [
    (True, "head", "unselected", 0), (False, "query", "unselected", 0), (True, "query", "unselected", 0),
    (False, "head", "all", 0), (True, "query", "all", 0),
    (True, "head", "unselected", 1), (True, "query", "all", 1), (True, "query-linear", "all", 1),
    (True, "query-block", "all", 1)])
def test_gluon_linear_options_match_plain_launch(layout, quant, hedgehog, mixing, linear_keys, query_features):
    """Hedgehog features, alpha per query and the linear branch over every key block in the Gluon epilogue
    (sparse_gluon=1): against the plain launch with the same options on every row (O to 16-bit rounding; psi
    is rounded before and after its per-row (1 - alpha) with alpha per query), the LSE, 1/den and alpha per
    row, at a ragged N and at Wan2.1-1.3B's (1, 12, 32760, 128), 90% and 97%.  ``query_features``: the
    Hedgehog phi(Q) computed inside the Gluon launch (LaunchConfig.gluon_query_features) instead of read from
    the q pre-pass; rounded to 16 bits as the pre-pass stores it, so the same tolerances hold."""
    gluon_launch = dataclasses.replace(GLUON_LAUNCH, gluon_query_features=query_features)
    for b, h, n in ((2, 3, 4001), (1, 12, 32760)):
        seed = int(torch.randint(1 << 30, ()))
        q, k, v, rq, rk, al = _inputs(b, h, n, 128, layout, dtype=torch.bfloat16, seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        weights = [signed_weights((0.3 * torch.randn(h, 128, 64, generator=g)).to(DEVICE), h, 128, torch.bfloat16)
                   if hedgehog else None for _ in range(2)]
        alpha_weight = (torch.randn(h, 128, generator=g).to(DEVICE) if mixing in ("query-linear", "query-block")
                        else None)
        for topk in (0.1, 0.03):
            args = (q, k, v, rq, rk, al, topk, 128, 64, quant, 0, 0, layout, True)
            plain = S.sla2_fwd(*args, PLAIN_LAUNCH.as_ints(), *weights, mixing, linear_keys, alpha_weight)
            gluon = S.sla2_fwd(*args, gluon_launch.as_ints(), *weights, mixing, linear_keys, alpha_weight)
            assert torch.equal(plain[1], gluon[1])  # the same LUT drives both
            o_dims = ("batch", "token", "head", "channel") if layout == "bnhd" else ("batch", "head", "token", "channel")
            rows = ("batch*head", "token")
            for name, i, dims, rel, tol in (("O", 0, o_dims, 5e-3, 3e-2), ("LSE", 2, rows, 1e-5, 1e-3),
                                            ("1/den", 3, rows, 1e-5, 1e-4), ("alpha per row", 6, rows, 1e-5, 1e-4)):
                got, want = gluon[i], plain[i]
                assert got.shape == want.shape, name
                if want.numel():
                    assert rel_l2(got, want) <= rel and torch.isfinite(got).all(), (
                        seed, topk, _mismatch(name, got, want, dims, tol))
            assert gluon[6].numel() == (b * h * n if mixing in ("query", "query-linear", "query-block") else 0)


@needs_hopper
def test_gluon_sparse_launch_compiles_once_for_any_n_and_topk():
    """One compiled kernel serves every N and top-k, and is right for each (against the plain launch): a
    ragged N, one selected block (the pipelined loop's prologue alone), as many as the ring has slots, more,
    and all of them (no linear branch)."""
    def variants():
        return sum(len(cache[0]) for cache in gluon_kernels.fwd_sparse_gluon_kernel.device_caches.values())

    counts = []
    for n, topk in [(1000, 0.2), (1537, 0.2), (2048, 0.07), (777, 0.5), (4001, 0.01), (4001, 0.05), (4001, 1.0)]:
        q, k, v, rq, rk, al = _inputs(1, 2, n, 128, "bnhd", dtype=torch.bfloat16, seed=n)
        _check_gluon_against_plain(q, k, v, rq, rk, al, topk, "bnhd")
        torch.cuda.synchronize()
        counts.append(variants())
    assert counts[0] > 0 and len(set(counts)) == 1, counts


def _gluon_outputs(q, k, v, rq, rk, al, topk, layout, quant, **schedule):
    """(O, LSE, 1/den) of the Gluon launch run with ``schedule`` (launch_sparse_gluon's keywords)."""
    launch = gluon_kernels.launch_sparse_gluon
    gluon_kernels.launch_sparse_gluon = functools.partial(launch, **schedule)
    try:
        o, _, lse, inv_den = S.sla2_fwd(q, k, v, rq, rk, al, topk, 128, 64, quant, 0, 0, layout, True,
                                        GLUON_LAUNCH.as_ints())[:4]
    finally:
        gluon_kernels.launch_sparse_gluon = launch
    return o, lse, inv_den


@needs_hopper
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
@pytest.mark.parametrize("quant,topk", [("none", 0.03), ("none", 0.1), ("none", 0.3), ("int8-fp8", 0.03),
                                        ("int8-fp8", 0.3)])
def test_gluon_schedules_agree(layout, quant, topk, monkeypatch):
    """Every schedule of the Gluon launch computes the same rows: one program per work item, and persistent
    programs (as many as SMs, and 5 with a 2-slot ring, so that each loops over ~40 items: the K/V ring, the
    Q / H_rest barriers and the softmax turns run on across tiles, n_sel not always a multiple of the slots).
    Schedules with the same loop are bit-identical (the same math per item); the overlapped loop adds
    PV(j) before the rescale instead of after, so it agrees with the serial one to bf16 rounding."""
    q, k, v, rq, rk, al = _inputs(2, 3, 4001, 128, layout, dtype=torch.bfloat16, seed=131)
    few = functools.partial(min, 5)
    results = {}
    for overlap in (True, False):
        per_item = _gluon_outputs(q, k, v, rq, rk, al, topk, layout, quant, persistent=False, overlap=overlap)
        per_sm = _gluon_outputs(q, k, v, rq, rk, al, topk, layout, quant, persistent=True, overlap=overlap)
        with monkeypatch.context() as m:
            m.setattr(gluon_kernels, "persistent_programs", lambda n_items, device: few(n_items))
            five = _gluon_outputs(q, k, v, rq, rk, al, topk, layout, quant, persistent=True, overlap=overlap,
                                  ring_slots=2)
        for name, a, b, c in zip(("O", "LSE", "1/den"), per_item, per_sm, five):
            assert torch.isfinite(a).all() and torch.equal(a, b) and torch.equal(a, c), (name, overlap)
        results[overlap] = per_item
    o_dims = ("batch", "token", "head", "channel") if layout == "bnhd" else ("batch", "head", "token", "channel")
    for name, got, want, dims, rel, tol in zip(("O", "LSE", "1/den"), results[True], results[False],
                                               (o_dims, ("batch*head", "token"), ("batch*head", "token")),
                                               (5e-3, 1e-6, 0.0), (3e-2, 1e-4, 0.0)):
        assert rel_l2(got, want) <= rel, _mismatch(name, got, want, dims, tol)
    _check_gluon_against_plain(q, k, v, rq, rk, al, topk, layout, quant)


@needs_hopper
@pytest.mark.parametrize("quant,topk", [("none", 0.03), ("none", 0.3), ("int8-fp8", 0.1), ("none", 1 / 63)])
def test_gluon_query_features_in_launch_across_schedules(quant, topk, monkeypatch):
    """LaunchConfig.gluon_query_features (the default): the H_rest buffer holds the head's Hedgehog weights, then H_rest, each
    item (two phases of its barriers per item).  Per-item and persistent programs (as many as SMs, and 5 with
    a 2-slot ring, so the weights load inside a ring that runs on across ~40 items; top-k 1/63 leaves one
    selected block, the weights then loading after the first) are bit-identical, and agree with phi(Q) read
    from the q pre-pass to 16-bit rounding (O, LSE, 1/den, alpha per row)."""
    b, h, n = 2, 3, 4001
    q, k, v, rq, rk, al = _inputs(b, h, n, 128, "bnhd", dtype=torch.bfloat16, seed=977)
    g = torch.Generator().manual_seed(978)
    weights = [signed_weights((0.3 * torch.randn(h, 128, 64, generator=g)).to(DEVICE), h, 128, torch.bfloat16)
               for _ in range(2)]
    in_launch = dataclasses.replace(GLUON_LAUNCH, gluon_query_features=1)

    def run(launch, **schedule):
        original = gluon_kernels.launch_sparse_gluon
        with monkeypatch.context() as m:
            m.setattr(gluon_kernels, "launch_sparse_gluon", functools.partial(original, **schedule))
            out = S.sla2_fwd(q, k, v, rq, rk, al, topk, 128, 64, quant, 0, 0, "bnhd", True, launch.as_ints(),
                             *weights, "query", "unselected")
        return [out[i] for i in (0, 2, 3, 6)]

    per_item = run(in_launch, persistent=False)
    per_sm = run(in_launch, persistent=True)
    with monkeypatch.context() as m:
        m.setattr(gluon_kernels, "persistent_programs", lambda n_items, device: min(n_items, 5))
        five = run(in_launch, persistent=True, ring_slots=2)
    prepass = run(dataclasses.replace(GLUON_LAUNCH, gluon_query_features=0))
    rows = ("batch*head", "token")
    for name, a, b_, c, d, dims, rel, tol in zip(
            ("O", "LSE", "1/den", "alpha per row"), per_item, per_sm, five, prepass,
            (("batch", "token", "head", "channel"), rows, rows, rows), (5e-3, 1e-5, 1e-4, 1e-4),
            (3e-2, 1e-3, 1e-3, 1e-3)):
        assert torch.isfinite(a).all() and torch.equal(a, b_) and torch.equal(a, c), name
        assert rel_l2(a, d) <= rel, _mismatch(name, a, d, dims, tol)


def test_default_launch_is_gluon_where_it_applies_and_plain_elsewhere(monkeypatch):
    """The default launch (sparse_gluon=2): the Gluon launch for 16-bit "none" and "int8-fp8" calls on a Hopper
    GPU (the outputs of sparse_gluon=1, bit for bit), the plain launch for everything else (sparse_gluon=0's
    outputs, bit for bit), and no usage error anywhere."""
    assert DEFAULT_LAUNCH.sparse_gluon == 2 and PLAIN_LAUNCH.sparse_gluon == 0
    assert LaunchConfig.from_ints(DEFAULT_LAUNCH.as_ints()) == DEFAULT_LAUNCH
    dataclasses.replace(DEFAULT_LAUNCH, sparse_ws=1)  # the warp-specialized launch wins; not a conflict
    with pytest.raises(ValueError, match="sparse_gluon"):
        dataclasses.replace(DEFAULT_LAUNCH, sparse_gluon=3)
    launched = []
    real = gluon_kernels.launch_sparse_gluon
    monkeypatch.setattr(gluon_kernels, "launch_sparse_gluon", lambda *a, **kw: launched.append(1) or real(*a, **kw))
    b, h, n = SIZES[1]
    q, k, v, rq, rk, al = _inputs(b, h, n, 64, "bnhd", dtype=WS_DTYPE, seed=101)
    for quant in ("none", "int8", "int8-fp8"):
        args = (q, k, v, rq, rk, al, 0.3, 128, 64, quant, 0, 0, "bnhd", True)
        expect_gluon = IS_HOPPER and quant in gluon_kernels.GLUON_QUANT_MODES
        want = S.sla2_fwd(*args, (GLUON_LAUNCH if expect_gluon else PLAIN_LAUNCH).as_ints())
        launched.clear()
        got = S.sla2_fwd(*args, DEFAULT_LAUNCH.as_ints())
        assert len(launched) == int(expect_gluon), (quant, launched)
        for name, a, b_ in zip(("O", "LUT", "LSE", "1/den"), got[:4], want[:4]):
            assert torch.equal(a, b_), (quant, name)


def test_gluon_sparse_launch_refuses_what_it_does_not_compute():
    """One-line GluonUnavailableError (a usage error) before anything is launched: low-bit modes, 32-bit
    inputs, 64-query blocks, a device that is not a Hopper GPU; and not together with sparse_ws."""
    b, h, n = SIZES[0]
    q, k, v, rq, rk, al = _inputs(b, h, n, 64, "bhnd", dtype=WS_DTYPE, seed=97)
    for kw, match in ((dict(quant="int8"), "computes quant in"), (dict(block_q=64), "block_q=128"),
                      (dict(block_k=128), "block_k=64")):
        with pytest.raises(gluon_kernels.GluonUnavailableError, match=match):
            _run_kernel(q, k, v, rq, rk, al, "bhnd", launch=GLUON_LAUNCH, topk=0.3, **kw)
    with pytest.raises(gluon_kernels.GluonUnavailableError, match="dtypes"):
        _run_kernel(q.float(), k.float(), v.float(), rq, rk, al, "bhnd", launch=GLUON_LAUNCH, topk=0.3)
    if not IS_HOPPER:
        with pytest.raises(gluon_kernels.GluonUnavailableError, match="needs a Hopper GPU"):
            _run_kernel(q, k, v, rq, rk, al, "bhnd", launch=GLUON_LAUNCH, topk=0.3)
    assert issubclass(gluon_kernels.GluonUnavailableError, SlaconvError)
    with pytest.raises(ValueError, match="sparse_ws and sparse_gluon"):
        dataclasses.replace(GLUON_LAUNCH, sparse_ws=1)


@needs_hopper
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
@pytest.mark.parametrize("b,h,n,d,mixing,linear_keys", [(2, 3, 4001, 64, "head", "unselected"),
                                                        (2, 3, 4096, 128, "query-linear", "all"),
                                                        (1, 12, 32760, 128, "head", "all")])
def test_gluon_backward_launches_match_the_plain_ones(monkeypatch, layout, b, h, n, d, mixing, linear_keys):
    """LaunchConfig.dkdv_gluon and dq_gluon: the Gluon dK / dV and dQ launches against the plain ones on the same
    forward, ragged N and Wan2.1-1.3B's shape, both layouts, alpha per head and per query row: dQ, dK and dV
    within 16-bit rounding, the alpha gradients unchanged (other launches)."""
    launched = []
    for name in ("launch_dkdv_gluon", "launch_dq_gluon"):
        real = getattr(gluon_backward, name)
        monkeypatch.setattr(gluon_backward, name,
                            lambda *a, _real=real, _name=name, **kw: launched.append(_name) or _real(*a, **kw))
    q, k, v, rq, rk, al = _inputs(b, h, n, d, layout, dtype=torch.bfloat16, seed=5 + n + d)
    weight = torch.randn(h, d, generator=torch.Generator().manual_seed(n)).to(DEVICE) if mixing != "head" else None
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(d)).to(DEVICE, torch.bfloat16)
    grads = []
    for on in (0, 1):
        leaves = _leaf(q, k, v, al, *([weight] if weight is not None else []))
        out = S.sla2_attention_triton(*leaves[:3], rq, rk, leaves[3], AttentionSpec(0.03), layout=layout,
                                      launch=dataclasses.replace(DEFAULT_LAUNCH, dkdv_gluon=on, dq_gluon=on),
                                      mixing=mixing, linear_keys=linear_keys,
                                      alpha_weight=leaves[4] if weight is not None else None)
        grads.append(torch.autograd.grad(out, leaves, go))
    assert sorted(launched) == ["launch_dkdv_gluon", "launch_dq_gluon"]
    dims = ("batch", "token", "head", "channel") if layout == "bnhd" else ("batch", "head", "token", "channel")
    for name, plain, fused in zip(("dQ", "dK", "dV", "dalpha", "dweight"), *grads):
        assert torch.isfinite(fused).all(), name
        assert rel_l2(fused, plain) <= 5e-3, (_mismatch(name, fused, plain, dims, 3e-2) if plain.dim() == 4
                                              else (name, rel_l2(fused, plain)))


def test_gluon_launches_apply_only_where_tma_can_read(monkeypatch):
    """The Gluon launches are picked only for 16-bit inputs, head dim 64 / 128, their block sizes and tensors TMA
    can read: a broadcast tensor (stride 0), a row stride off 16 bytes or a start off 16 bytes takes the plain
    launches, and forcing the Gluon forward on one is a one-line error."""
    monkeypatch.setattr(gluon_kernels, "check_device", lambda device: None)
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    good = torch.empty(1, 100, 12, 128, dtype=bf16)
    broadcast = torch.empty(1, 1, 12, 128, dtype=bf16).expand(2, 100, 12, 128)
    padded_rows = torch.empty(1, 100, 12, 132, dtype=bf16)[..., :128]
    shifted = torch.empty(100 * 12 * 128 + 1, dtype=bf16)[1:].view(1, 100, 12, 128)
    assert gluon_backward.applies(cuda, bf16, 128, 64, 64, (good, good))
    assert gluon_kernels.applies(cuda, bf16, 128, 128, 64, "none", (good, good))
    for bad in (broadcast, padded_rows, shifted):
        assert not gluon_backward.applies(cuda, bf16, 128, 64, 64, (good, bad))
        assert not gluon_kernels.applies(cuda, bf16, 128, 128, 64, "none", (bad, good))
        with pytest.raises(gluon_kernels.GluonUnavailableError, match="16-byte aligned"):
            gluon_kernels.check_supported(cuda, bf16, 128, 128, 64, "none", (bad, ))
    assert not gluon_backward.applies(cuda, torch.float32, 128, 64, 64, (good, ))
    assert not gluon_backward.applies(cuda, bf16, 128, 128, 64, (good, ))
    assert not gluon_backward.applies(cuda, bf16, 96, 64, 64, (good, ))


# --------------------------------------------------------------------------------------------------
# low-bit forwards
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["int8", "int8-fp8"])
@pytest.mark.parametrize("layout,d", [("bnhd", 64), ("bhnd", 128)])
def test_lowbit_forward(quant, layout, d):
    b, h, n = SIZES[1]
    q, k, v, rq, rk, al = _inputs(b, h, n, d, layout, seed=17 + d)
    kw = dict(topk=0.3, block_q=128, block_k=64, quant=quant)
    out = _run_kernel(q, k, v, rq, rk, al, layout, **kw)
    ref = _run_reference(*(t.float() for t in (q, k, v)), rq, rk, al, layout, **kw)
    cos = torch.nn.functional.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0).item()
    assert rel_l2(out, ref) <= 5e-2 and cos >= 0.999, (rel_l2(out, ref), cos)





@pytest.mark.skipif(DTYPE != torch.float32, reason="bit-level agreement needs exact (interpreter fp32) dots")
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_int8_forward_reproduces_the_reference_emulation(layout):
    """INT8 Q/K is deterministic given the scales, so with fp32 dots the kernel must reproduce the
    reference's emulation almost exactly, for every head.  The 5e-2 low-bit tolerance above hid a bug
    (v4: the K-smoothing mean was read from a strided view as if contiguous, so heads >= 1 smoothed with
    the wrong vector: still a valid shift, 8e-3 away from the emulation)."""
    b, h, n = 1, 3, 640
    q, k, v, rq, rk, al = _inputs(b, h, n, 64, layout, seed=23)
    al = al + 8.0  # alpha ~ 1: the sparse (quantised) branch dominates the output
    kw = dict(topk=0.25, block_q=128, block_k=64, quant="int8")
    out = _run_kernel(q, k, v, rq, rk, al, layout, **kw)
    ref = _run_reference(q, k, v, rq, rk, al, layout, **kw)
    exact = _run_reference(q, k, v, rq, rk, al, layout, **(kw | {"quant": "none"}))
    assert rel_l2(ref, exact) > 1e-3  # the quantisation is visible ...
    assert rel_l2(out, ref) <= 1e-3, rel_l2(out, ref)  # ... and the kernel reproduces it (rounding ties aside)


def test_lowbit_lse_is_valid_for_bf16_backward():
    """The quantised forward corrects its LSE for the K shift: P recomputed from the original Q, K with
    that LSE must sum to ~1 over the selected keys."""
    b, h, n = SIZES[0]
    d = 64
    q, k, v, rq, rk, al = _inputs(b, h, n, d, "bhnd", seed=23)
    _, lut, lse, *_ = _forward_outputs(q, k, v, rq, rk, al, 0.5, 64, 64, "int8-fp8", "bhnd")
    _, _, lse_ref, *_ = _forward_outputs(q, k, v, rq, rk, al, 0.5, 64, 64, "none", "bhnd")
    # int8 logits move the LSE by a few thousandths of a log2 unit, not by q . mean(K)
    assert (lse - lse_ref).abs().max().item() < 0.1


def test_lowbit_backward_runs_straight_through():
    b, h, n = SIZES[0]
    q, k, v, rq, rk, al = _inputs(b, h, n, 64, "bnhd", seed=29)
    qk, kk, vk, ak = _leaf(q, k, v, al)
    out = _run_kernel(qk, kk, vk, rq, rk, ak, "bnhd", topk=0.3, quant="int8-fp8")
    out.float().square().sum().backward()
    qn, kn, vn, an = _leaf(q, k, v, al)
    out_n = _run_kernel(qn, kn, vn, rq, rk, an, "bnhd", topk=0.3, quant="none")
    out_n.float().square().sum().backward()
    for a, bb in ((qk, qn), (kk, kn), (vk, vn)):
        assert torch.isfinite(a.grad).all()
        assert rel_l2(a.grad, bb.grad) < 0.1


# --------------------------------------------------------------------------------------------------
# API: errors, layouts through strides, compile, recompiles
# --------------------------------------------------------------------------------------------------


def test_bad_head_dim_and_args():
    q = torch.randn(1, 2, 100, 96, device=DEVICE, dtype=DTYPE)
    rq = torch.eye(96).repeat(2, 1, 1).to(DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        _run_kernel(q, q, q, rq, rq, torch.zeros(2, device=DEVICE), "bhnd", topk=0.1)
    q = torch.randn(1, 2, 100, 64, device=DEVICE, dtype=DTYPE)
    with pytest.raises(ValueError, match="quant"):
        _run_kernel(q, q, q, rq, rq, torch.zeros(2), "bhnd", topk=0.1, quant="fp4")
    with pytest.raises(ValueError, match="block sizes"):
        _run_kernel(q, q, q, rq, rq, torch.zeros(2), "bhnd", topk=0.1, block_k=32)
    with pytest.raises(ValueError, match="layout"):
        _run_kernel(q, q, q, rq, rq, torch.zeros(2), "nhd", topk=0.1)
    with pytest.raises(ValueError, match="quant must be one of \\('none', 'int8', 'int8-fp8'\\)"):
        sla2_attention(q, q, q, rq, rq, torch.zeros(2), topk=0.1, quant="fp4", layout="bhnd")


def test_strided_views_of_fused_qkv():
    """q, k, v as non-contiguous views of one fused (B, N, 3, H, D) projection, as diffusers may hand them."""
    b, h, n = SIZES[0]
    d = 64
    g = torch.Generator().manual_seed(31)
    qkv = torch.randn(b, n, 3, h, d, generator=g).to(DEVICE, DTYPE)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    _, _, _, rq, rk, al = _inputs(b, h, n, d, "bnhd", seed=31)
    out = _run_kernel(q, k, v, rq, rk, al, "bnhd", topk=0.4, block_q=64)
    ref = _run_reference(q.float(), k.float(), v.float(), rq, rk, al, "bnhd", topk=0.4, block_q=64)
    assert rel_l2(out, ref) <= TOL


@pytest.mark.parametrize("launch", [None, dataclasses.replace(DEFAULT_LAUNCH, tile_m_fwd=64, lin_stages=4)],
                         ids=["default-launch", "explicit-launch"])
def test_torch_compile_fullgraph_no_graph_break(launch):
    b, h, n = SIZES[0]
    d = 64
    q, k, v, rq, rk, al = _inputs(b, h, n, d, "bnhd", seed=37)

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha_logit = torch.nn.Parameter(al.clone())

        def forward(self, q, k, v):
            return sla2_attention(q, k, v, rq, rk, self.alpha_logit, topk=0.3, layout="bnhd", backend="triton",
                                  launch=launch) * 2.0

    torch._dynamo.reset()
    mod = Attn()
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    qk, kk, vk = _leaf(q, k, v)
    out = compiled(qk, kk, vk)
    out.float().sum().backward()
    eager = mod(q, k, v)
    assert rel_l2(out, eager) < 1e-6
    assert qk.grad is not None and mod.alpha_logit.grad is not None
    explain = torch._dynamo.explain(Attn())(q, k, v)
    assert explain.graph_break_count == 0


@pytest.mark.parametrize("mixing", ["query", "query-linear"])
def test_torch_compile_with_hedgehog_and_query_mixing(mixing):
    """The custom ops' fake implementations cover the optional feature weights, alpha per row and the rows'
    alpha logits of query-linear: one graph, and the compiled gradients (the weights' included) equal the eager
    ones."""
    (q, k, v, rq, rk, al), (wq, wk), _ = _linear_option_inputs(200, 64, 64, 0.3, "bnhd", DTYPE, True, 43)
    aw = torch.randn(2, 64, generator=torch.Generator().manual_seed(44)).to(DEVICE)

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha_logit, self.wq, self.wk, self.aw = (torch.nn.Parameter(t.clone()) for t in (al, wq, wk, aw))

        def forward(self, q, k, v):
            return S.sla2_attention_triton(q, k, v, rq, rk, self.alpha_logit, AttentionSpec(0.3, 64), layout="bnhd",
                                           feature_q=self.wq, feature_k=self.wk, mixing=mixing,
                                           alpha_weight=self.aw if mixing == "query-linear" else None)

    torch._dynamo.reset()
    mod = Attn()
    params = [mod.alpha_logit, mod.wq, mod.wk] + ([mod.aw] if mixing == "query-linear" else [])
    grads = []
    for fn in (torch.compile(mod, fullgraph=True, backend="aot_eager"), mod):
        mod.zero_grad()
        leaves = _leaf(q, k, v)
        fn(*leaves).float().square().sum().backward()
        grads.append([t.grad.clone() for t in (*leaves, *params)])
    for name, compiled, eager in zip("q k v alpha_logit feature_q feature_k alpha_weight".split(), *grads):
        assert torch.count_nonzero(eager) > 0 and rel_l2(compiled, eager) < 1e-6, name


@pytest.mark.skipif(not HAS_CUDA, reason="the interpreter has no compile cache to count; checked on the GPU run")
def test_no_recompile_when_n_or_topk_changes():
    def n_variants():
        total = 0
        for fn in (forward_kernels.fwd_lin_kernel, forward_kernels.fwd_sparse_kernel, backward_kernels.bwd_dq_kernel,
                   backward_kernels.bwd_dq_lin_kernel, backward_kernels.bwd_dkdv_kernel,
                   backward_kernels.bwd_dkdv_lin_kernel):
            for cache in fn.device_caches.values():
                total += len(cache[0])
        return total

    counts = []
    for n, topk in [(1000, 0.2), (1537, 0.2), (2048, 0.07), (777, 0.5)]:
        q, k, v, rq, rk, al = _inputs(1, 2, n, 128, "bnhd", seed=n)
        qk, kk, vk, ak = _leaf(q, k, v, al)
        out = _run_kernel(qk, kk, vk, rq, rk, ak, "bnhd", topk=topk)
        out.float().sum().backward()
        torch.cuda.synchronize()
        counts.append(n_variants())
    assert counts[0] > 0 and len(set(counts)) == 1, counts
