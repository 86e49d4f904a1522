"""SLA2 attention on Triton: router + LUT in PyTorch, fused forward, fused backward (DESIGN.md section 2).

Entry point: :func:`sla2_attention_triton` (called by :mod:`slaconv.kernels.ops`).  The work is
registered as two ``torch.library`` custom ops, ``slaconv::sla2_fwd`` and ``slaconv::sla2_bwd``, with
fake implementations and an autograd formula, so ``torch.compile`` traces a module that calls it
without a graph break.

Extra memory (beside the output): phi(K) as a temporary (B*H*N*D, input dtype), the linear branch's state
per query block handed from the linear launch to the sparse launch (H_all - H_sel and z: B*H*(N/b_q)*D^2, O_l's
size at b_q = D, half of it at D = 64 and b_q = 128, twice at D = 128 and b_q = 64; with
``CONFIG["lin_state"] = False`` an O_l temporary of B*H*N*D instead), z per key block (B*H*nk*D fp32), the LUT
(B*H*nq*n_sel int32), D x D and D totals per (b, h) (and per pre-pass split), and for the low-bit modes INT8/FP8
copies of Q, K, V.  Saved for the backward: O (which the next layer keeps anyway), the LUT, the LSE and 1/den
(two fp32 per row) and the D x D totals; the backward recomputes phi(Q), phi(K) and the linear numerator
instead of saving O_s, O_l, phi(Q), phi(K) (4 x B*H*N*D: 0.4 GB per Wan2.1-1.3B layer at 480p), and builds the
inverted index (B*H*nt*n_sel int32).  Nothing O(N^2), no per-key-block D x D state.

The kernels live in ``sla2_triton_kernels.py``; they are looked up through that module object at call
time so the test suite can reload it under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math

import torch
import triton

from . import reference
from . import sla2_triton_kernels as _K

__all__ = ["sla2_attention_triton", "router_lut", "inverted_index", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (64, 128)
LAYOUTS = ("bnhd", "bhnd")
# Tuning knobs (module globals so the benchmark can compare variants; defaults are the measured best).
CONFIG = {
    "tile_m_fwd": 128,  # query rows per forward program (capped at block_q)
    "num_warps": 8,  # forward sparse launch; None: 4 for D=64, 8 for D=128
    "num_stages": 3,
    "pair": 1,  # selected key blocks per loop step (1 or 2) in the bf16 forward and the linear loops (H200 sweep)
    "pair_lowbit": 1,  # same for the int8 / int8-fp8 sparse loop (2 spills there)
    "lin_warps": 8,  # forward linear launch and dQ-linear launch (D x D accumulator)
    # 5: three tile buffers (the LUT load takes a stage); H100 sweep 2026-11-27: fwd 1.40 -> 1.35 ms, fwd+bwd
    # 5.68 -> 5.29 ms at (1,12,32760,128), 97%
    "lin_stages": 5,
    "tile_m_bwd": 64,  # query rows per dq program / per inverted-index entry
    "num_warps_bwd": 4,
    "num_stages_bwd": 2,  # 2 programs per SM in dQ / dK / dV (H200 sweep: fwd+bwd 7.74 -> 7.03 ms)
    "dkdv_split": True,  # sparse dK and dV in two launches with one accumulator each
    # The linear launch writes each routing block's complement state (H_all - H_sel, D x D in the input
    # dtype, and z) and the sparse launch's epilogue finishes the branch: no Q re-read or phi(Q) in the linear
    # launch, no O_l round trip (at b_q = D the state is O_l's size).  H100 sweep 2026-11-27, with
    # lin_stages 5: fwd none 1.40 -> 1.30 ms, int8-fp8 1.52 -> 1.41 ms.  False: the O_l path.
    "lin_state": True,
}
_QUANT_ID = {"none": 0, "int8": 1, "int8-fp8": 2}


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dims(x: torch.Tensor, layout: str):
    """(B, H, N, D) and the (batch, head, token) strides of a tensor in ``layout``."""
    if layout == "bnhd":
        b, n, h, d = x.shape
        return (b, h, n, d), (x.stride(0), x.stride(2), x.stride(1))
    b, h, n, d = x.shape
    return (b, h, n, d), (x.stride(0), x.stride(1), x.stride(2))


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    # Kernels need a unit head-dim stride; every layout diffusers hands us has one.
    return x if x.stride(-1) == 1 else x.contiguous()


def _nsplit(bh: int, nblocks: int) -> int:
    """Programs per (b, h) for the reduction pre-passes: enough to fill the GPU, at most one per block."""
    target = 16 if _interpreting() else 264
    return max(1, min(nblocks, -(-target // bh)))


def _launch_cfg(d: int, bwd: bool = False):
    if _interpreting():
        return {}
    nw = CONFIG["num_warps_bwd" if bwd else "num_warps"] or (4 if d == 64 else 8)
    return {"num_warps": nw, "num_stages": CONFIG["num_stages_bwd" if bwd else "num_stages"]}


def _feats_cfg(d: int):
    return {} if _interpreting() else {"num_warps": 4, "num_stages": 1}


def _prepass_cfg(d: int):
    # the reduction pre-passes hold a D x D fp32 accumulator: spread it over 8 warps for D = 128
    return {} if _interpreting() else {"num_warps": 4 if d == 64 else 8, "num_stages": 2}


def _check(q, k, v, layout, quant, block_q, block_k):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if quant not in _QUANT_ID:
        raise ValueError(f"quant must be one of {tuple(_QUANT_ID)}, got {quant!r}")
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be 4-D with equal shapes, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"SLA2 Triton kernel supports head dims {SUPPORTED_HEAD_DIMS}, got {d}")
    if block_q not in (64, 128) or block_k not in (64, 128):
        raise ValueError(f"block sizes must be 64 or 128, got block_q={block_q}, block_k={block_k}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {q.dtype}")


# --------------------------------------------------------------------------------------------------
# router, LUT and the inverted index (PyTorch on small tensors)
# --------------------------------------------------------------------------------------------------


def router_lut(q_bar, k_bar, mean_k, router_q, router_k, n_sel):
    """Pooled router -> sorted int32 LUT (B, H, nq, n_sel); ``mean_k`` is the token mean of K (B, H, D)."""
    # fp32 whatever the caller's autocast (stage 2 runs under bf16 autocast): the ranking needs it
    with torch.autocast(device_type=q_bar.device.type, enabled=False):
        qp = torch.matmul(q_bar.float(), router_q.float())
        kp = torch.matmul(k_bar.float() - mean_k.float().unsqueeze(2), router_k.float())
        scores = torch.matmul(qp, kp.transpose(-1, -2)).contiguous()  # 1/sqrt(d) does not change the order
    *lead, nq, nk = scores.shape
    lut = torch.empty(*lead, nq, n_sel, device=scores.device, dtype=torch.int32)
    # one program per row: bisection for the n_sel-th score + prefix-sum compaction (was a radix sort of
    # every row, 75 us at the Wan2.1-1.3B shape on an H200)
    _K._topk_lut[(scores.numel() // nk,)](scores, lut, nk, n_sel, NK_P=triton.next_power_of_2(nk),
                                          **({} if _interpreting() else {"num_warps": 4}))
    return lut


def inverted_index(lut: torch.Tensor, n: int, block_q: int, nk: int, tile_m: int):
    """Key block -> query tiles (of ``tile_m`` rows) that selected it, CSR per (b, h).

    Returns ``offsets`` (B*H*nk + 1,) int32 into ``tiles`` (B*H*nt*n_sel,) int32, grouped by
    (b*H + h)*nk + key block.  Built with sort/scatter_add (no host sync), no dense map.
    """
    b, h, nq, n_sel = lut.shape
    nt = -(-n // tile_m)
    dev = lut.device
    tile_blk = (torch.arange(nt, device=dev) * tile_m) // block_q  # routing block of each tile
    keys = lut.view(b * h, nq, n_sel).long()[:, tile_blk, :]  # (BH, nt, n_sel)
    bh_off = (torch.arange(b * h, device=dev) * nk).view(-1, 1, 1)
    flat_key = (keys + bh_off).reshape(-1)
    tile_id = torch.arange(nt, device=dev).view(1, nt, 1).expand_as(keys).reshape(-1)
    order = torch.sort(flat_key * nt + tile_id).values
    tiles = (order % nt).to(torch.int32)
    # scatter_add, not bincount: bincount reads the max key back to the host (a device sync per backward
    # call, which drains the launch queue of every layer in eager training)
    counts = torch.zeros(b * h * nk, dtype=torch.int64, device=dev).scatter_add_(0, flat_key, torch.ones_like(flat_key))
    offsets = torch.zeros(b * h * nk + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets.to(torch.int32), tiles


# --------------------------------------------------------------------------------------------------
# forward / backward drivers
# --------------------------------------------------------------------------------------------------


def _forward(q, k, v, router_q, router_k, alpha_logit, topk, block_q, block_k, quant, layout, save):
    _check(q, k, v, layout, quant, block_q, block_k)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    (B, H, N, D), sq = _dims(q, layout)
    _, sk = _dims(k, layout)
    _, sv = _dims(v, layout)
    dev = q.device
    BH = B * H
    tm = min(CONFIG["tile_m_fwd"], block_q)
    nq, nk, nt = -(-N // block_q), -(-N // block_k), -(-N // tm)
    n_sel = reference.topk_count(topk, nk)
    qid = _QUANT_ID[quant]
    sm_scale = 1.0 / math.sqrt(D)
    qk_scale = sm_scale * reference.LOG2E
    f32 = torch.float32
    pair = CONFIG["pair"]
    pair_sparse = pair if qid == 0 else CONFIG["pair_lowbit"]

    npad = nk * block_k
    # pass over K (and V for the FP8 scale): key-block means and sums, phi(K), z per block, max|V| per block
    k_bar = torch.empty(BH, nk, D, device=dev, dtype=f32)
    # per-block K sums and z in one buffer (two contiguous halves): one reduction gives mean(K) and z_all
    block_sums = torch.empty(2, BH, nk, D, device=dev, dtype=f32)
    ksb, zb = block_sums[0], block_sums[1]
    vmb = torch.empty(BH, nk, D, device=dev, dtype=f32) if qid == 2 else zb
    phik = torch.empty(BH, N, D, device=dev, dtype=q.dtype)
    _K._k_feats[(nk, BH)](
        k, v, k_bar, ksb, zb, vmb, phik, *sk, *sv, N, H, nk, D=D, BLOCK_N=block_k, NEED_VMAX=qid == 2, NEG=True,
        **_feats_cfg(D),
    )  # phik holds -phi(K): the linear loops start from H_all and end on H_all - H_sel
    # H_all = sum phi(K)^T V as a split-K GEMM over the key blocks
    ns = _nsplit(BH, nk)
    hp = torch.empty(BH, ns, D, D, device=dev, dtype=f32)
    _K._kv_outer[(ns, BH)](phik, v, hp, *sv, N, H, nk, ns, D=D, BLOCK_N=block_k, **_prepass_cfg(D))
    h_all = hp.sum(dim=1)
    ksum, z_all = block_sums.sum(dim=2)
    vmax = vmb.amax(dim=1) if qid == 2 else ksum
    # pass over Q: block means (+ INT8 Q)
    q_bar = torch.empty(BH, nq, D, device=dev, dtype=f32)
    if qid:
        qq = torch.empty(BH, N, D, device=dev, dtype=torch.int8)
        qs = torch.empty(BH, nq, device=dev, dtype=f32)
    else:
        qq = qs = q_bar  # unused
    _K._q_prepass[(nq, BH)](q, q_bar, qq, qs, *sq, N, H, nq, qk_scale, D=D, BLOCK=block_q, QUANT=qid)

    lut = router_lut(q_bar.view(B, H, nq, D), k_bar.view(B, H, nk, D), ksum.view(B, H, D) / N, router_q, router_k, n_sel)

    if qid:
        kq = torch.empty(BH, N, D, device=dev, dtype=torch.int8)
        ks = torch.empty(BH, nk, device=dev, dtype=f32)
        vq = torch.empty(BH, D, npad, device=dev, dtype=torch.float8_e4m3fn) if qid == 2 else ks
        _K._kv_quant[(nk, BH)](
            k, v, ksum, vmax, kq, ks, vq, *sk, *sv, N, H, nk, npad, 1.0 / N, D=D, BLOCK_N=block_k, QUANT=qid,
            FP8_EMU=_interpreting(),
        )
    else:
        kq = ks = vq = ksum  # unused

    alpha = torch.sigmoid(alpha_logit.detach().float()).contiguous()
    o = torch.empty(q.shape, device=dev, dtype=q.dtype)
    _, so = _dims(o, layout)
    rden = torch.empty(BH, N, device=dev, dtype=f32)
    # the backward needs only the LSE beside O, 1/den and the D x D totals (inference: not even the LSE)
    lse = torch.empty(BH, N if save else 0, device=dev, dtype=f32)
    has_lin = int(n_sel < nk)
    state = bool(CONFIG["lin_state"])
    if state:  # temporaries: the linear launch -> the sparse launch's epilogue
        hd = torch.empty(BH, nq, D, D, device=dev, dtype=q.dtype)
        zd = torch.empty(BH, nq, D, device=dev, dtype=f32)
        o_l = hd  # unused
    else:
        o_l = torch.empty(BH, N, D, device=dev, dtype=q.dtype)  # temporary: the linear launch -> the mix
        hd = zd = o_l  # unused
    lin_cfg = {} if _interpreting() else {"num_warps": CONFIG["lin_warps"], "num_stages": CONFIG["lin_stages"]}
    _K._fwd_lin_kernel[(nt, BH)](
        q, v, phik, zb, lut, h_all, z_all, o_l, rden, hd, zd,
        *sq, *sv, N, H, n_sel, nq, nk, block_q, has_lin,
        D=D, BLOCK_M=tm, BLOCK_N=block_k, PAIR=pair, STATE=state, **lin_cfg,
    )
    _K._fwd_sparse_kernel[(nt, BH)](
        q, k, v, qq, qs, kq, ks, vq, vmax, ksum, lut, alpha,
        o, o_l, lse if save else rden, hd, zd, rden,
        *sq, *sk, *sv, *so,
        N, H, n_sel, nq, nk, block_q, qk_scale, 1.0 / N, npad, has_lin,
        D=D, BLOCK_M=tm, BLOCK_N=block_k, PAIR=pair_sparse, QUANT=qid, FP8_EMU=_interpreting(), SAVE=save,
        LIN_STATE=state, **_launch_cfg(D),
    )
    return o, lut, lse, rden, h_all, z_all


def _backward(do, q, k, v, alpha_logit, lut, o, lse, rden, h_all, z_all, block_q, block_k, layout):
    do, q, k, v, o = _unit_last(do), _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(o)
    (B, H, N, D), sq = _dims(q, layout)
    _, sk = _dims(k, layout)
    _, sv = _dims(v, layout)
    _, sd = _dims(do, layout)
    _, so = _dims(o, layout)
    dev = q.device
    BH = B * H
    tm = min(CONFIG["tile_m_bwd"], block_q)
    tl_m = min(CONFIG["tile_m_fwd"], block_q)
    nq, nk, nt = -(-N // block_q), -(-N // block_k), -(-N // tm)
    n_sel = lut.shape[-1]
    sm_scale = 1.0 / math.sqrt(D)
    qk_scale = sm_scale * reference.LOG2E
    cfg = _launch_cfg(D, bwd=True)
    f32 = torch.float32
    alpha = torch.sigmoid(alpha_logit.detach().float()).contiguous()
    pair = CONFIG["pair"]
    lin_cfg = {} if _interpreting() else {"num_warps": CONFIG["lin_warps"], "num_stages": CONFIG["lin_stages"]}

    # phi(K), z per key block and phi(Q) are recomputed, not saved by the forward: with O (kept by the next
    # layer anyway), the LSE and 1/den that is all a training step holds beyond what dense attention holds.
    k_bar = torch.empty(BH, nk, D, device=dev, dtype=f32)
    ksb = torch.empty(BH, nk, D, device=dev, dtype=f32)
    zb = torch.empty(BH, nk, D, device=dev, dtype=f32)
    phik = torch.empty(BH, N, D, device=dev, dtype=k.dtype)
    _K._k_feats[(nk, BH)](k, v, k_bar, ksb, zb, zb, phik, *sk, *sv, N, H, nk, D=D, BLOCK_N=block_k,
                          NEED_VMAX=False, **_feats_cfg(D))
    phiq = torch.empty(BH, N, D, device=dev, dtype=q.dtype)  # becomes psi below, in place
    _K._phi_rows[(nt, BH)](q, phiq, *sq, N, H, D=D, BLOCK=tm, **_feats_cfg(D))

    dq = torch.empty(q.shape, device=dev, dtype=q.dtype)
    dk = torch.empty(k.shape, device=dev, dtype=k.dtype)
    dv = torch.empty(v.shape, device=dev, dtype=v.dtype)
    _, sdq = _dims(dq, layout)
    _, sdk = _dims(dk, layout)
    _, sdv = _dims(dv, layout)
    # linear part of dQ; also w = rowsum(dO*O_l) for the launches below
    w = torch.empty(BH, N, device=dev, dtype=f32)
    _K._bwd_dq_lin_kernel[(-(-N // tl_m), BH)](
        v, do, dq, zb, lut, w, rden, h_all, z_all, alpha, phiq, phik,
        *sv, *sd, *sdq, N, H, n_sel, nq, nk, block_q, D=D, BLOCK_M=tl_m, BLOCK_N=block_k, PAIR=pair, **lin_cfg,
    )
    delta = torch.empty(BH, N, device=dev, dtype=f32)
    bp = torch.empty(BH, nt, D, device=dev, dtype=f32)
    dap = torch.empty(BH, nt, device=dev, dtype=f32)
    _K._bwd_rows[(nt, BH)](phiq, do, o, w, rden, alpha, delta, bp, dap, *sd, *so, N, H, nt, D=D, BLOCK_M=tm, **_feats_cfg(D))
    # psi = (1-alpha) phi(Q) / den, in phi(Q)'s buffer: A = sum psi^T dO as a split-K GEMM
    _K._phi_to_psi[(nt, BH)](phiq, rden, alpha, N, H, D=D, BLOCK=tm, **_feats_cfg(D))
    psi = phiq
    ns = _nsplit(BH, nt)
    ap = torch.empty(BH, ns, D, D, device=dev, dtype=f32)
    _K._bwd_outer[(ns, BH)](psi, do, ap, *sd, N, H, nt, ns, D=D, BLOCK_M=tm, **_prepass_cfg(D))
    a_all = ap.sum(dim=1)
    b_all = bp.sum(dim=1)
    dalpha = dap.sum(dim=1).view(B, H).sum(dim=0).to(alpha_logit.dtype)  # already d/d(alpha logit)
    koff, kqt = inverted_index(lut, N, block_q, nk, tm)
    _K._bwd_dq_kernel[(nt, BH)](
        q, k, v, do, dq, lut, lse, delta, alpha,
        *sq, *sk, *sv, *sd, *sdq, N, H, n_sel, nq, nk, block_q, qk_scale, sm_scale,
        D=D, BLOCK_M=tm, BLOCK_N=block_k, PAIR=1, **cfg,
    )
    _K._bwd_dkdv_lin_kernel[(nk, BH)](
        v, do, dk, dv, koff, kqt, w, a_all, b_all, psi, phik,
        *sv, *sd, *sdk, *sdv, N, H, nk, D=D, BLOCK_M=tm, BLOCK_N=block_k, **lin_cfg,
    )
    phases = [(True, False), (False, True)] if CONFIG["dkdv_split"] else [(True, True)]
    for do_dk, do_dv in phases:
        _K._bwd_dkdv_kernel[(nk, BH)](
            q, k, v, do, dk, dv, koff, kqt, lse, delta, alpha,
            *sq, *sk, *sv, *sd, *sdk, *sdv, N, H, n_sel, nq, nk, block_q, qk_scale, sm_scale, nt,
            D=D, BLOCK_M=tm, BLOCK_N=block_k, DO_DK=do_dk, DO_DV=do_dv, **cfg,
        )
    return dq, dk, dv, dalpha


# --------------------------------------------------------------------------------------------------
# custom ops + autograd
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("slaconv::sla2_fwd", mutates_args=())
def sla2_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, router_q: torch.Tensor, router_k: torch.Tensor,
    alpha_logit: torch.Tensor, topk: float, block_q: int, block_k: int, quant: str, layout: str, save: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (O, LUT, LSE, 1/den, H_all, z_all); O and the rest are saved for the backward.  ``save=False``
    (inference) skips writing the LSE: it comes back empty (0 columns)."""
    return _forward(q, k, v, router_q, router_k, alpha_logit, topk, block_q, block_k, quant, layout, save)


@sla2_fwd.register_fake
def _(q, k, v, router_q, router_k, alpha_logit, topk, block_q, block_k, quant, layout, save=True):
    _check(q, k, v, layout, quant, block_q, block_k)
    if layout == "bnhd":
        B, N, H, D = q.shape
    else:
        B, H, N, D = q.shape
    nq, nk = -(-N // block_q), -(-N // block_k)
    n_sel = reference.topk_count(topk, nk)
    BH = B * H
    f32 = torch.float32
    return (
        q.new_empty(q.shape),
        q.new_empty((B, H, nq, n_sel), dtype=torch.int32),
        q.new_empty((BH, N if save else 0), dtype=f32),
        q.new_empty((BH, N), dtype=f32),
        q.new_empty((BH, D, D), dtype=f32),
        q.new_empty((BH, D), dtype=f32),
    )


@torch.library.custom_op("slaconv::sla2_bwd", mutates_args=())
def sla2_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha_logit: torch.Tensor,
    lut: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, rden: torch.Tensor, h_all: torch.Tensor,
    z_all: torch.Tensor, block_q: int, block_k: int, layout: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV, d alpha_logit); bf16/fp16 on the original Q, K, V (straight-through for low-bit)."""
    return _backward(do, q, k, v, alpha_logit, lut, o, lse, rden, h_all, z_all, block_q, block_k, layout)


@sla2_bwd.register_fake
def _(do, q, k, v, alpha_logit, lut, o, lse, rden, h_all, z_all, block_q, block_k, layout):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), alpha_logit.new_empty(alpha_logit.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, router_q, router_k, alpha_logit, topk, block_q, block_k, quant, layout, _save = inputs
    o, lut, lse, rden, h_all, z_all = output
    ctx.save_for_backward(q, k, v, alpha_logit, lut, o, lse, rden, h_all, z_all)
    ctx.cfg = (block_q, block_k, layout)


def _autograd_backward(ctx, do, *_unused):
    q, k, v, alpha_logit, lut, o, lse, rden, h_all, z_all = ctx.saved_tensors
    block_q, block_k, layout = ctx.cfg
    dq, dk, dv, dalpha = sla2_bwd(do, q, k, v, alpha_logit, lut, o, lse, rden, h_all, z_all, block_q, block_k, layout)
    return dq, dk, dv, None, None, dalpha, None, None, None, None, None, None


sla2_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


def sla2_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    router_q: torch.Tensor,
    router_k: torch.Tensor,
    alpha_logit: torch.Tensor,
    *,
    topk: float,
    block_q: int = 128,
    block_k: int = 64,
    quant: str = "none",
    layout: str = "bnhd",
) -> torch.Tensor:
    """SLA2 attention (DESIGN.md section 1) on q, k, v in ``layout`` ("bnhd" or "bhnd"); returns the
    output in that layout and dtype.  Differentiable w.r.t. q, k, v and alpha_logit (the hard top-k
    router gets no gradient)."""
    _check(q, k, v, layout, quant, block_q, block_k)
    # the tensors only the backward reads are written only when a backward can follow
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, alpha_logit))
    return sla2_fwd(q, k, v, router_q, router_k, alpha_logit, float(topk), int(block_q), int(block_k), quant, layout, save)[0]
