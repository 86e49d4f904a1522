"""Triton kernels for SLA2 attention (DESIGN.md section 2).  The Python side is ``sla2_triton.py``.

Conventions shared by every kernel:

* ``bh`` = b * H + h is the second grid axis; user tensors (q, k, v, o, dO, dq, dk, dv) are read and
  written through their (batch, head, token) strides, the head-dim stride is 1.
* Internal per-row tensors (LSE in log2 units, 1/den of the linear branch, delta, c) are (B*H, N) fp32;
  saved branch outputs O_s, O_l are (B*H, N, D) in the input dtype; quantised copies are (B*H, N, D).
* Only D, the tile sizes, the quant mode and the dtype-dependent choices are constexpr.  N, the number
  of selected blocks, block counts, the softmax scale and all strides are runtime arguments listed in
  ``do_not_specialize`` so that a new resolution or top-k never recompiles.
* Token-level "all minus selected" for the linear branch: the totals H_all = sum_j phi(K_j)^T V_j and
  z_all = sum_j phi(K_j) come from ``_kv_prepass``; the sparse loop subtracts the selected blocks'
  terms from the K/V tiles it already holds.
"""

from __future__ import annotations

import triton
import triton.language as tl

_FWD_RUNTIME = [
    "sqb", "sqh", "sqn", "skb", "skh", "skn", "svb", "svh", "svn", "sob", "soh", "son",
    "N", "H", "n_sel", "nq", "nk", "block_q", "qk_scale", "has_lin",
]


@triton.jit
def _phi(x):
    """softmax over the last (head) dim, fp32 in and out."""
    mx = tl.max(x, axis=1)
    e = tl.exp(x - mx[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _fp8_preround(x):
    """Round fp32 to the nearest FP8 e4m3 value (as fp32).  Only used under TRITON_INTERPRET: the
    interpreter's fp32->fp8 cast drops the carry when the mantissa rounds up to the next power of two
    (124.3 -> 64 instead of 128, Triton 3.9); pre-rounded values convert exactly.  The GPU cast is
    hardware round-to-nearest and skips this."""
    e = tl.maximum(tl.floor(tl.log2(tl.maximum(tl.abs(x), 1e-30))), -6.0)
    ulp = tl.exp2(e - 3.0)
    return tl.floor(x / ulp + 0.5) * ulp


@triton.jit
def _to_fp8(x, EMU: tl.constexpr):
    if EMU:
        x = _fp8_preround(x)
    return x.to(tl.float8e4nv)


@triton.jit(do_not_specialize=["sxb", "sxh", "sxn", "N", "H", "nb", "mult"])
def _q_prepass(
    X, XBAR, XQ, XS, PHIX,
    sxb, sxh, sxn, N, H, nb, mult,
    D: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr,
):
    """Block mean of Q (router), phi(Q) (saved), and, if QUANT, INT8 of Q*mult with one scale per block."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    valid = offs < N
    x = tl.load(X + b * sxb + h * sxh + offs[:, None] * sxn + offs_d[None, :], mask=valid[:, None], other=0.0)
    xf = x.to(tl.float32)
    cnt = tl.minimum(N - pid * BLOCK, BLOCK).to(tl.float32)
    tl.store(XBAR + (bh * nb + pid) * D + offs_d, tl.sum(xf, axis=0) / cnt)
    tl.store(PHIX + (bh * N + offs[:, None]) * D + offs_d[None, :], _phi(xf).to(PHIX.dtype.element_ty), mask=valid[:, None])
    if QUANT > 0:
        xs = xf * mult
        amax = tl.max(tl.max(tl.abs(xs), axis=1), axis=0)
        scale = tl.maximum(amax, 1e-8) / 127.0
        y = xs / scale
        y = tl.where(y >= 0, y + 0.5, y - 0.5)
        y = tl.minimum(tl.maximum(y, -127.0), 127.0)
        tl.store(XQ + (bh * N + offs[:, None]) * D + offs_d[None, :], y.to(tl.int32).to(tl.int8), mask=valid[:, None])
        tl.store(XS + bh * nb + pid, scale)


@triton.jit(do_not_specialize=["skb", "skh", "skn", "svb", "svh", "svn", "N", "H", "nk", "nsplit"])
def _kv_prepass(
    K, V, KBAR, HP, ZP, VMAXP, PHIK,
    skb, skh, skn, svb, svh, svn, N, H, nk, nsplit,
    D: tl.constexpr, BLOCK_N: tl.constexpr, NEED_VMAX: tl.constexpr,
):
    """One pass over K, V: key-block means (router), partial H = sum phi(K)^T V, z = sum phi(K), max|V|."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    acc_h = tl.zeros((D, D), dtype=tl.float32)
    acc_z = tl.zeros((D,), dtype=tl.float32)
    vmax = tl.zeros((D,), dtype=tl.float32)
    for kb in range(pid, nk, nsplit):
        offs = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = offs < N
        k = tl.load(K + b * skb + h * skh + offs[:, None] * skn + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(V + b * svb + h * svh + offs[:, None] * svn + offs_d[None, :], mask=valid[:, None], other=0.0)
        kf = k.to(tl.float32)
        cnt = tl.minimum(N - kb * BLOCK_N, BLOCK_N).to(tl.float32)
        tl.store(KBAR + (bh * nk + kb) * D + offs_d, tl.sum(kf, axis=0) / cnt)
        phik = tl.where(valid[:, None], _phi(kf), 0.0).to(k.dtype)
        tl.store(PHIK + (bh * N + offs[:, None]) * D + offs_d[None, :], phik, mask=valid[:, None])
        acc_h = tl.dot(tl.trans(phik), v, acc_h)
        acc_z += tl.sum(phik.to(tl.float32), axis=0)
        if NEED_VMAX:
            vmax = tl.maximum(vmax, tl.max(tl.abs(v.to(tl.float32)), axis=0))
    base = bh * nsplit + pid
    tl.store(HP + base * D * D + offs_d[:, None] * D + offs_d[None, :], acc_h)
    tl.store(ZP + base * D + offs_d, acc_z)
    if NEED_VMAX:
        tl.store(VMAXP + base * D + offs_d, vmax)


@triton.jit(do_not_specialize=["skb", "skh", "skn", "svb", "svh", "svn", "N", "H", "nk"])
def _kv_quant(
    K, V, MEANK, VSCALE, KQ, KS, VQ,
    skb, skh, skn, svb, svh, svn, N, H, nk,
    D: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr, FP8_EMU: tl.constexpr,
):
    """INT8 of the smoothed K (one scale per key block); for QUANT == 2 also FP8 e4m3 of V / scale[channel]."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    valid = offs < N
    k = tl.load(K + b * skb + h * skh + offs[:, None] * skn + offs_d[None, :], mask=valid[:, None], other=0.0)
    mean = tl.load(MEANK + bh * D + offs_d)
    ks = tl.where(valid[:, None], k.to(tl.float32) - mean[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(ks), axis=1), axis=0)
    scale = tl.maximum(amax, 1e-8) / 127.0
    y = ks / scale
    y = tl.where(y >= 0, y + 0.5, y - 0.5)
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    tl.store(KQ + (bh * N + offs[:, None]) * D + offs_d[None, :], y.to(tl.int32).to(tl.int8), mask=valid[:, None])
    tl.store(KS + bh * nk + pid, scale)
    if QUANT == 2:
        v = tl.load(V + b * svb + h * svh + offs[:, None] * svn + offs_d[None, :], mask=valid[:, None], other=0.0)
        vs = tl.load(VSCALE + bh * D + offs_d)
        vq = tl.minimum(tl.maximum(v.to(tl.float32) / vs[None, :], -448.0), 448.0)
        # stored (B*H, D, N): token-contiguous, the K-major operand layout FP8 MMAs want for P @ V
        tl.store(VQ + (bh * D + offs_d[None, :]) * N + offs[:, None], _to_fp8(vq, FP8_EMU), mask=valid[:, None])


@triton.jit(do_not_specialize=_FWD_RUNTIME)
def _fwd_kernel(
    Q, K, V, QQ, QS, KQ, KS, VQ, VSCALE, MEANK, LUT, HALL, ZALL, ALPHA, PHIQ, PHIK,
    O, OS, OL, LSE, RDEN,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    N, H, n_sel, nq, nk, block_q, qk_scale, has_lin,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr,
    HI_PREC: tl.constexpr, FP8_EMU: tl.constexpr, LIN_FP8: tl.constexpr,
    SPARSE: tl.constexpr, LIN: tl.constexpr,
):
    """One query tile over its LUT row.  SPARSE and LIN pick the branches this launch computes: both in
    one launch, or LIN first (writes O_l, 1/den) then SPARSE (writes O, O_s, LSE and mixes) -- two
    launches with one fp32 accumulator each instead of two, which keeps the tile out of register spills."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    qblk = (pid_m * BLOCK_M) // block_q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_valid = offs_m < N

    row = bh * N + offs_m
    if SPARSE:
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=m_valid[:, None], other=0.0)
        if QUANT > 0:
            qq = tl.load(QQ + (bh * N + offs_m[:, None]) * D + offs_d[None, :], mask=m_valid[:, None], other=0)
            q_scale = tl.load(QS + bh * nq + qblk)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    if LIN:
        phiq = tl.load(PHIQ + (bh * N + offs_m[:, None]) * D + offs_d[None, :], mask=m_valid[:, None], other=0.0)
        if LIN_FP8:
            phiq8 = _to_fp8(phiq.to(tl.float32) * 448.0, FP8_EMU)
        num = tl.zeros((BLOCK_M, D), dtype=tl.float32)
        den = tl.zeros((BLOCK_M,), dtype=tl.float32)
    lut = LUT + (bh * nq + qblk) * n_sel
    for it in range(0, n_sel):
        kb = tl.load(lut + it)
        offs_n = kb * BLOCK_N + offs_n0
        n_valid = offs_n < N
        if QUANT == 2:
            vq = tl.load(VQ + (bh * D + offs_d[None, :]) * N + offs_n[:, None], mask=n_valid[:, None], other=0.0)
        if (QUANT != 2) or (LIN and not LIN_FP8):
            v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        if SPARSE:
            if QUANT == 0:
                k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=n_valid[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k)) * qk_scale
            else:
                kq = tl.load(KQ + (bh * N + offs_n[:, None]) * D + offs_d[None, :], mask=n_valid[:, None], other=0)
                k_scale = tl.load(KS + bh * nk + kb)
                s = tl.dot(qq, tl.trans(kq), out_dtype=tl.int32).to(tl.float32) * (q_scale * k_scale)
            s = tl.where(n_valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            corr = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * corr + tl.sum(p, axis=1)
            acc = acc * corr[:, None]
            if QUANT == 2:
                acc = tl.dot(_to_fp8(p * 448.0, FP8_EMU), vq, acc)
            else:
                acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
        if LIN:
            # linear branch: subtract this selected block's share (token level).
            phik = tl.load(PHIK + (bh * N + offs_n[:, None]) * D + offs_d[None, :], mask=n_valid[:, None], other=0.0)
            if LIN_FP8:
                # FP8 for the subtracted share only (the fp32 totals stay exact); num is in V/vscale*448 units
                phik8 = _to_fp8(phik.to(tl.float32) * 448.0, FP8_EMU)
                kern = tl.dot(phiq8, tl.trans(phik8)) * (1.0 / (448.0 * 448.0))
                kern = tl.where(n_valid[None, :], kern, 0.0)
                den += tl.sum(kern, axis=1)
                num = tl.dot(_to_fp8(kern * 448.0, FP8_EMU), vq, num)
            else:
                kern = tl.dot(phiq, tl.trans(phik))
                kern = tl.where(n_valid[None, :], kern, 0.0)
                den += tl.sum(kern, axis=1)
                num = tl.dot(kern.to(v.dtype), v, num)

    if QUANT == 2:
        vscale = tl.load(VSCALE + bh * D + offs_d)
    if LIN:
        if LIN_FP8:
            num = num * (vscale / 448.0)[None, :]
        h_all = tl.load(HALL + bh * D * D + offs_d[:, None] * D + offs_d[None, :])
        z_all = tl.load(ZALL + bh * D + offs_d)
        phiq_f = phiq.to(tl.float32)
        if HI_PREC:
            num_t = tl.dot(phiq_f, h_all, input_precision="tf32x3") - num
        else:
            num_t = tl.dot(phiq_f, h_all) - num
        den_t = tl.sum(phiq_f * z_all[None, :], axis=1) - den + 1e-6
        lin_on = has_lin != 0
        rden = tl.where(lin_on, 1.0 / den_t, 0.0)
        o_l = num_t * rden[:, None]
        tl.store(OL + row[:, None] * D + offs_d[None, :], o_l.to(OL.dtype.element_ty), mask=m_valid[:, None])
        tl.store(RDEN + row, rden, mask=m_valid)
    if SPARSE:
        o_s = acc / l_i[:, None]
        if QUANT == 2:
            o_s = o_s * (vscale / 448.0)[None, :]
        lse = m_i + tl.log2(l_i)
        if QUANT > 0:
            # the quantised logits used K - mean(K); the bf16 backward needs the LSE of the unshifted logits.
            meank = tl.load(MEANK + bh * D + offs_d)
            lse += tl.sum(q.to(tl.float32) * meank[None, :], axis=1) * qk_scale
        if not LIN:
            # split launch: the linear launch ran first and wrote O_l
            o_l = tl.load(OL + row[:, None] * D + offs_d[None, :], mask=m_valid[:, None], other=0.0).to(tl.float32)
        alpha = tl.load(ALPHA + h)
        o = alpha * o_s + (1.0 - alpha) * o_l
        tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], o.to(O.dtype.element_ty), mask=m_valid[:, None])
        tl.store(OS + row[:, None] * D + offs_d[None, :], o_s.to(OS.dtype.element_ty), mask=m_valid[:, None])
        tl.store(LSE + row, lse, mask=m_valid)


@triton.jit(do_not_specialize=["sqb", "sqh", "sqn", "sdb", "sdh", "sdn", "N", "H", "nt", "nsplit"])
def _bwd_prepass(
    PHIQ, DO, OS, OL, RDEN, ALPHA, DELTA, CC, AP, BP, DALP,
    sqb, sqh, sqn, sdb, sdh, sdn, N, H, nt, nsplit,
    D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Per row: delta = alpha*rowsum(dO*O_s), c = -(1-alpha)*rowsum(dO*O_l)/den; per (b,h) partial sums
    A = sum phi(q)^T g with g = (1-alpha) dO / den, b = sum c*phi(q), and sum dO*(O_s - O_l) for d alpha."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    alpha = tl.load(ALPHA + h)
    acc_a = tl.zeros((D, D), dtype=tl.float32)
    acc_b = tl.zeros((D,), dtype=tl.float32)
    acc_da = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in range(pid, nt, nsplit):
        offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = offs_m < N
        row = bh * N + offs_m
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=valid[:, None], other=0.0)
        phiq = tl.load(PHIQ + row[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0)
        o_s = tl.load(OS + row[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        o_l = tl.load(OL + row[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        rden = tl.load(RDEN + row, mask=valid, other=0.0)
        dof = do.to(tl.float32)
        delta = alpha * tl.sum(dof * o_s, axis=1)
        cc = -(1.0 - alpha) * rden * tl.sum(dof * o_l, axis=1)
        tl.store(DELTA + row, delta, mask=valid)
        tl.store(CC + row, cc, mask=valid)
        acc_da += tl.sum(dof * (o_s - o_l), axis=1)
        g = (dof * ((1.0 - alpha) * rden)[:, None]).to(phiq.dtype)
        acc_a = tl.dot(tl.trans(phiq), g, acc_a)
        acc_b += tl.sum(cc[:, None] * phiq.to(tl.float32), axis=0)
    base = bh * nsplit + pid
    tl.store(AP + base * D * D + offs_d[:, None] * D + offs_d[None, :], acc_a)
    tl.store(BP + base * D + offs_d, acc_b)
    tl.store(DALP + base, tl.sum(acc_da, axis=0))


_BWD_RUNTIME = [
    "sqb", "sqh", "sqn", "skb", "skh", "skn", "svb", "svh", "svn", "sdb", "sdh", "sdn",
    "N", "H", "n_sel", "nq", "nk", "block_q", "qk_scale", "sm_scale",
]


@triton.jit(do_not_specialize=_BWD_RUNTIME + ["sxb", "sxh", "sxn"])
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LUT, LSE, DELTA, CC, RDEN, HALL, ZALL, ALPHA, PHIQ, PHIK,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sxb, sxh, sxn,
    N, H, n_sel, nq, nk, block_q, qk_scale, sm_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HI_PREC: tl.constexpr,
    SPARSE: tl.constexpr, LIN: tl.constexpr,
):
    """dQ over the LUT: sparse FA2 part + linear part (total minus selected), through phi's Jacobian.
    DQ has strides (sxb, sxh, sxn).  Split launches (LIN first, then SPARSE adding to DQ) as in forward."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    qblk = (pid_m * BLOCK_M) // block_q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_valid = offs_m < N
    row = bh * N + offs_m
    alpha = tl.load(ALPHA + h)
    dq_ptrs = DQ + b * sxb + h * sxh + offs_m[:, None] * sxn + offs_d[None, :]

    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    if SPARSE:
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=m_valid[:, None], other=0.0)
        lse = tl.load(LSE + row, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + row, mask=m_valid, other=0.0)
        do_s = (do.to(tl.float32) * alpha).to(do.dtype)
        dq = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    if LIN:
        cc = tl.load(CC + row, mask=m_valid, other=0.0)
        rden = tl.load(RDEN + row, mask=m_valid, other=0.0)
        gf = do.to(tl.float32) * ((1.0 - alpha) * rden)[:, None]
        g = gf.to(do.dtype)
        dphi = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    lut = LUT + (bh * nq + qblk) * n_sel
    for it in range(0, n_sel):
        kb = tl.load(lut + it)
        offs_n = kb * BLOCK_N + offs_n0
        n_valid = offs_n < N
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        if SPARSE:
            k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=n_valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            p = tl.where(n_valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do_s, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq)
        if LIN:
            phik = tl.load(PHIK + (bh * N + offs_n[:, None]) * D + offs_d[None, :], mask=n_valid[:, None], other=0.0)
            dkern = tl.dot(g, tl.trans(v)) + cc[:, None]
            dkern = tl.where(n_valid[None, :], dkern, 0.0)
            dphi = tl.dot(dkern.to(phik.dtype), phik, dphi)

    if LIN:
        phiq_f = tl.load(PHIQ + row[:, None] * D + offs_d[None, :], mask=m_valid[:, None], other=0.0).to(tl.float32)
        h_all = tl.load(HALL + bh * D * D + offs_d[:, None] * D + offs_d[None, :])
        z_all = tl.load(ZALL + bh * D + offs_d)
        if HI_PREC:
            dphi_t = tl.dot(gf, tl.trans(h_all), input_precision="tf32x3")
        else:
            dphi_t = tl.dot(gf, tl.trans(h_all))
        dphi_t = dphi_t + cc[:, None] * z_all[None, :] - dphi
        dq_lin = phiq_f * (dphi_t - tl.sum(phiq_f * dphi_t, axis=1)[:, None])
    if SPARSE:
        dq = dq * sm_scale
        if LIN:
            dq += dq_lin
        else:
            dq += tl.load(dq_ptrs, mask=m_valid[:, None], other=0.0).to(tl.float32)
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_valid[:, None])
    else:
        tl.store(dq_ptrs, dq_lin.to(DQ.dtype.element_ty), mask=m_valid[:, None])


@triton.jit(do_not_specialize=_BWD_RUNTIME + ["nt", "sxb", "sxh", "sxn", "syb", "syh", "syn"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, KOFF, KQT, LSE, DELTA, CC, RDEN, AALL, BALL, ALPHA, PHIQ, PHIK,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sxb, sxh, sxn, syb, syh, syn,
    N, H, n_sel, nq, nk, block_q, qk_scale, sm_scale, nt,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HI_PREC: tl.constexpr,
    SPARSE: tl.constexpr, LIN: tl.constexpr,
):
    """dK, dV for one key block over the query tiles that selected it (inverted index KOFF/KQT).
    DK has strides (sxb, sxh, sxn), DV (syb, syh, syn).  Split launches: LIN writes, SPARSE adds."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_m0 = tl.arange(0, BLOCK_M)
    n_valid = offs_n < N
    alpha = tl.load(ALPHA + h)
    dk_ptrs = DK + b * sxb + h * sxh + offs_n[:, None] * sxn + offs_d[None, :]
    dv_ptrs = DV + b * syb + h * syh + offs_n[:, None] * syn + offs_d[None, :]

    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=n_valid[:, None], other=0.0)
    dv = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    if SPARSE:
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        dk = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    if LIN:
        phik = tl.load(PHIK + (bh * N + offs_n[:, None]) * D + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        dphik = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    start = tl.load(KOFF + bh * nk + pid_n)
    end = tl.load(KOFF + bh * nk + pid_n + 1)
    for idx in range(start, end):
        t = tl.load(KQT + idx)
        offs_m = t * BLOCK_M + offs_m0
        m_valid = offs_m < N
        row = bh * N + offs_m
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=m_valid[:, None], other=0.0)
        dof = do.to(tl.float32)
        if SPARSE:
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=m_valid[:, None], other=0.0)
            lse = tl.load(LSE + row, mask=m_valid, other=0.0)
            delta = tl.load(DELTA + row, mask=m_valid, other=0.0)
            do_s = (dof * alpha).to(do.dtype)
            s_t = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M)
            p_t = tl.where(m_valid[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
            dv = tl.dot(p_t.to(do.dtype), do_s, dv)
            dp_t = tl.dot(v, tl.trans(do_s))
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk)
        if LIN:
            # linear branch, selected share (subtracted from the totals below)
            cc = tl.load(CC + row, mask=m_valid, other=0.0)
            rden = tl.load(RDEN + row, mask=m_valid, other=0.0)
            g = (dof * ((1.0 - alpha) * rden)[:, None]).to(do.dtype)
            phiq = tl.load(PHIQ + row[:, None] * D + offs_d[None, :], mask=m_valid[:, None], other=0.0)
            kern_t = tl.dot(phik, tl.trans(phiq))
            dv = dv - tl.dot(kern_t.to(do.dtype), g)
            dkern_t = tl.dot(v, tl.trans(g)) + cc[None, :]
            dphik = tl.dot(dkern_t.to(phiq.dtype), phiq, dphik)

    if LIN:
        a_all = tl.load(AALL + bh * D * D + offs_d[:, None] * D + offs_d[None, :])
        b_all = tl.load(BALL + bh * D + offs_d)
        phik_f = phik.to(tl.float32)
        if HI_PREC:
            dv_lin = tl.dot(phik_f, a_all, input_precision="tf32x3")
            dphi_t = tl.dot(v.to(tl.float32), tl.trans(a_all), input_precision="tf32x3")
        else:
            dv_lin = tl.dot(phik_f, a_all)
            dphi_t = tl.dot(v.to(tl.float32), tl.trans(a_all))
        dv = dv + dv_lin
        dphi_t = dphi_t + b_all[None, :] - dphik
        dk_lin = phik_f * (dphi_t - tl.sum(phik_f * dphi_t, axis=1)[:, None])
    if SPARSE:
        dk = dk * sm_scale
        if LIN:
            dk += dk_lin
        else:
            dk += tl.load(dk_ptrs, mask=n_valid[:, None], other=0.0).to(tl.float32)
            dv += tl.load(dv_ptrs, mask=n_valid[:, None], other=0.0).to(tl.float32)
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_valid[:, None])
    else:
        tl.store(dk_ptrs, dk_lin.to(DK.dtype.element_ty), mask=n_valid[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_valid[:, None])
