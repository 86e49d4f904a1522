"""Triton kernels for SLA2 attention (DESIGN.md section 2).  The Python side is ``sla2_triton.py``.

Conventions shared by every kernel:

* ``bh`` = b * H + h is the second grid axis; user tensors (q, k, v, o, dO, dq, dk, dv) are read and
  written through their (batch, head, token) strides, the head-dim stride is 1.
* Internal per-row tensors (LSE in log2 units, 1/den of the linear branch, w, delta) are (B*H, N) fp32;
  the temporaries O_l, phi(Q) / psi and phi(K) are (B*H, N, D) in the input dtype.  The forward saves
  only O, the LSE and 1/den for the backward, which recomputes the rest.
* Only D, the tile sizes, the quant mode and the dtype-dependent choices are constexpr.  N, the number
  of selected blocks, block counts and the softmax scale are runtime arguments listed in
  ``do_not_specialize`` so that a new resolution or top-k never recompiles.  Strides are deliberately
  *not* listed: Triton's divisible-by-16 specialisation is what lets it prove row alignment and load
  tiles with 16-byte cp.async instead of 2-byte scalar loads (2-3x slower loops), and with D = 64/128
  and a unit head-dim stride every stride of both layouts is a multiple of 16 for any N, so the
  specialisation key never changes (tests/test_kernel_codegen.py checks the loads).
* Linear branch as "all minus selected" in D x D form: the totals H_all = sum_j phi(K_j)^T V_j and
  z_all = sum_j phi(K_j) come from ``_k_feats`` (per key block) and ``_kv_outer`` (per-split partials,
  one deterministic sum); a query
  tile accumulates its selected blocks' H_sel = sum_{j in M_i} phi(K_j)^T V_j (one D x D x block MMA per
  selected block) and finishes O_l = phi(Q)(H_all - H_sel) / (phi(Q)(z_all - z_sel) + eps).  The
  backward uses the same form (A_all - A_sel over the inverted index for dK/dV).
* ``PAIR`` = 2 walks two selected key blocks per loop iteration (a 2*BLOCK_N key tile gathered from two
  LUT entries; an odd last entry is masked).
"""

from __future__ import annotations

import triton
import triton.language as tl


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


@triton.jit
def _lut_offsets(lut, it, n_sel, N, offs_c, BLOCK_N: tl.constexpr, PAIR: tl.constexpr):
    """Token offsets of the key tile of loop step ``it`` (PAIR LUT entries), their validity and block ids."""
    kb0 = tl.load(lut + it)
    if PAIR == 2:
        kb1 = tl.load(lut + tl.minimum(it + 1, n_sel - 1))
        lim = tl.where(it + 1 < n_sel, 2 * BLOCK_N, BLOCK_N)  # an odd last step uses its first half only
        first = offs_c < BLOCK_N
        offs_n = tl.where(first, kb0 * BLOCK_N + offs_c, kb1 * BLOCK_N + offs_c - BLOCK_N)
        offs_n = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
        n_valid = (offs_n < N) & (offs_c < lim)
    else:
        kb1 = kb0
        offs_n = kb0 * BLOCK_N + offs_c
        offs_n = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
        n_valid = offs_n < N
    return offs_n, n_valid, kb0, kb1


@triton.jit(do_not_specialize=["nk", "n_sel"])
def _topk_lut(S, LUT, nk, n_sel, NK_P: tl.constexpr):
    """One row of router scores -> its ``n_sel`` highest key blocks, written in ascending block order.

    The n_sel-th largest score is found by a 32-step bisection on order-preserving integer keys (cost
    independent of n_sel, no sort); blocks above it are taken, ties at it by lowest index; a prefix sum
    gives each selected block its slot, so the LUT row comes out sorted."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, NK_P)
    valid = offs < nk
    x = tl.load(S + row * nk + offs, mask=valid, other=0.0)
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)  # float order == integer order
    key = tl.where(valid, key, -(2**40))
    lo = tl.full((), -(2**31), tl.int64)  # count(key >= lo) >= n_sel always holds
    hi = tl.full((), 2**31 - 1, tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        ok = tl.sum((key >= mid).to(tl.int32), axis=0) >= n_sel
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    gt = key > lo
    eq = key == lo
    room = n_sel - tl.sum(gt.to(tl.int32), axis=0)
    sel = gt | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= room))
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    tl.store(LUT + row * n_sel + pos, offs, mask=sel)


@triton.jit
def _softmax_step(s, m_i, l_i, acc):
    """One FA2 online-softmax step on logits ``s`` (log2 units, masked to -inf): returns the block's
    probabilities P and the updated running max, row sum and rescaled accumulator (P @ V still to add)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    corr = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, m_new, l_i * corr + tl.sum(p, axis=1), acc * corr[:, None]


@triton.jit
def _phi_rden(q, zd, has_lin):
    """phi(Q) of a query tile (fp32) and 1/den = 1/(phi(Q)(z_all - z_sel) + eps) (0 if every block is selected)."""
    phiq = _phi(q.to(tl.float32))
    den = tl.sum(phiq * zd[None, :], axis=1) + 1e-6
    return phiq, tl.where(has_lin != 0, 1.0 / den, 0.0)


@triton.jit
def _linear_output(q, hd, zd, has_lin):
    """The linear branch of a query tile from its complement totals hd = H_all - H_sel (input dtype) and
    zd = z_all - z_sel: returns O_l = phi(Q) hd / den and 1/den (both 0 if every block is selected)."""
    phiq, rden = _phi_rden(q, zd, has_lin)
    # 16-bit operands: the output is 16-bit; fp32 operands (tf32) doubled the register peak
    return tl.dot(phiq.to(q.dtype), hd) * rden[:, None], rden


# --------------------------------------------------------------------------------------------------
# forward pre-passes
# --------------------------------------------------------------------------------------------------


@triton.jit
def _int8_tile(x):
    """Symmetric INT8 of an fp32 tile with one scale (amax / 127), rounding half away from zero:
    returns the int8 tile and the scale."""
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale = tl.maximum(amax, 1e-8) / 127.0
    y = x / scale
    y = tl.where(y >= 0, y + 0.5, y - 0.5)
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    return y.to(tl.int32).to(tl.int8), scale


@triton.jit(do_not_specialize=["N", "H", "nb", "mult"])
def _q_prepass(
    X, XBAR, XQ, XS,
    sxb, sxh, sxn, N, H, nb, mult,
    D: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr,
):
    """Block mean of Q (router) and, if QUANT, INT8 of Q*mult with one scale per block."""
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
    if QUANT > 0:
        y, scale = _int8_tile(xf * mult)
        tl.store(XQ + (bh * N + offs[:, None]) * D + offs_d[None, :], y, mask=valid[:, None])
        tl.store(XS + bh * nb + pid, scale)


@triton.jit(do_not_specialize=["N", "H", "nk"])
def _k_feats(
    K, V, KBAR, KSB, ZB, VMB, PHIK,
    skb, skh, skn, svb, svh, svn, N, H, nk,
    D: tl.constexpr, BLOCK_N: tl.constexpr, NEED_VMAX: tl.constexpr, NEG: tl.constexpr = False,
):
    """Per key block, one program each (no loop, so the pass runs at full occupancy): the block mean of K
    (router) and its sum (for mean(K)), phi(K) (saved), its column sums z (ZB) and, if NEED_VMAX, the
    block's max|V| per channel.  The caller reduces the per-block rows (deterministic torch sums).
    NEG (the forward): PHIK holds -phi(K), so the linear loop accumulates H_all - H_sel directly; z per
    block stays positive."""
    kb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    valid = offs < N
    k = tl.load(K + b * skb + h * skh + offs[:, None] * skn + offs_d[None, :], mask=valid[:, None], other=0.0)
    kf = k.to(tl.float32)
    cnt = tl.minimum(N - kb * BLOCK_N, BLOCK_N).to(tl.float32)
    bsum = tl.sum(kf, axis=0)
    row = (bh * nk + kb) * D + offs_d
    tl.store(KSB + row, bsum)
    tl.store(KBAR + row, bsum / cnt)
    phik32 = tl.where(valid[:, None], _phi(kf), 0.0)
    phik = phik32.to(k.dtype)
    if NEG:
        sign = -1.0
    else:
        sign = 1.0
    tl.store(PHIK + (bh * N + offs[:, None]) * D + offs_d[None, :], (phik32 * sign).to(k.dtype), mask=valid[:, None])
    tl.store(ZB + row, tl.sum(phik.to(tl.float32), axis=0))
    if NEED_VMAX:
        v = tl.load(V + b * svb + h * svh + offs[:, None] * svn + offs_d[None, :], mask=valid[:, None], other=0.0)
        tl.store(VMB + row, tl.max(tl.abs(v.to(tl.float32)), axis=0))


@triton.jit(do_not_specialize=["N", "H", "nk", "nsplit"])
def _kv_outer(
    PHIK, V, HP,
    svb, svh, svn, N, H, nk, nsplit,
    D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Partial H = sum phi(K)^T V over one contiguous run of key blocks (a split-K GEMM; the caller sums
    the nsplit partials).  A bare load-and-MMA loop, so the loads pipeline."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    per = tl.cdiv(nk, nsplit)
    acc = tl.zeros((D, D), dtype=tl.float32)
    for kb in range(pid * per, tl.minimum(nk, pid * per + per)):
        offs = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = offs < N
        phik = tl.load(PHIK + (bh * N + offs[:, None]) * D + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(V + b * svb + h * svh + offs[:, None] * svn + offs_d[None, :], mask=valid[:, None], other=0.0)
        acc = tl.dot(tl.trans(phik), v, acc)
    # PHIK is the forward's buffer, which holds -phi(K) (_k_feats NEG): store the partial of +H
    tl.store(HP + (bh * nsplit + pid) * D * D + offs_d[:, None] * D + offs_d[None, :], -acc)


@triton.jit(do_not_specialize=["N", "H", "nk", "inv_n"])
def _kv_quant(
    K, V, KSUM, VMAX, KQ, KS, VQ,
    skb, skh, skn, svb, svh, svn, N, H, nk, npad, inv_n,
    D: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr, FP8_EMU: tl.constexpr,
):
    """INT8 of the smoothed K (one scale per key block); for QUANT == 2 also FP8 e4m3 of
    V / (max|V|[channel] / 448), stored (B*H, D, npad) token-contiguous (the K-major operand FP8 MMAs want
    for P @ V), zero-padded to whole key blocks so the kernel loads it unmasked."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    valid = offs < N
    k = tl.load(K + b * skb + h * skh + offs[:, None] * skn + offs_d[None, :], mask=valid[:, None], other=0.0)
    mean = tl.load(KSUM + bh * D + offs_d) * inv_n
    ks = tl.where(valid[:, None], k.to(tl.float32) - mean[None, :], 0.0)
    y, scale = _int8_tile(ks)
    tl.store(KQ + (bh * N + offs[:, None]) * D + offs_d[None, :], y, mask=valid[:, None])
    tl.store(KS + bh * nk + pid, scale)
    if QUANT == 2:
        v = tl.load(V + b * svb + h * svh + offs[:, None] * svn + offs_d[None, :], mask=valid[:, None], other=0.0)
        vs = tl.maximum(tl.load(VMAX + bh * D + offs_d), 1e-8) / 448.0
        vq = tl.minimum(tl.maximum(v.to(tl.float32) / vs[None, :], -448.0), 448.0)
        vq = tl.where(valid[:, None], vq, 0.0)
        tl.store(VQ + (bh * D + offs_d[None, :]) * npad + offs[:, None], _to_fp8(vq, FP8_EMU))


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _hsel(acc_h, PHIK, V, ZB, lut, bh, b, h, svb, svh, svn, N, n_sel, nk,
          D: tl.constexpr, BLOCK_N: tl.constexpr, PAIR: tl.constexpr):
    """acc_h + sum over the LUT row of PHIK_j^T V_j (D x D fp32) and z_sel = sum phi(K_j) (from the
    per-block sums ZB: the loaded PHIK tile feeds the MMA only).  The forward passes -phi(K) and starts
    from H_all, so the loop ends on H_all - H_sel (no D x D subtraction after it); the backward passes
    phi(K) and zeros."""
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, BLOCK_N * PAIR)
    acc_z = tl.zeros((D,), dtype=tl.float32)
    for it in range(0, n_sel, PAIR):
        offs_n, n_valid, kb0, kb1 = _lut_offsets(lut, it, n_sel, N, offs_c, BLOCK_N, PAIR)
        phik = tl.load(PHIK + (bh * N + offs_n[:, None]) * D + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        acc_h = tl.dot(tl.trans(phik), v, acc_h)
        acc_z += tl.load(ZB + (bh * nk + kb0) * D + offs_d)
        if PAIR == 2:
            acc_z += tl.load(ZB + (bh * nk + kb1) * D + offs_d) * tl.where(it + 1 < n_sel, 1.0, 0.0)
    return acc_h, acc_z


@triton.jit(do_not_specialize=["N", "H", "n_sel", "nq", "nk", "block_q", "has_lin"])
def _fwd_lin_kernel(
    Q, V, PHIK, ZB, LUT, HALL, ZALL, OL, RDEN, HD, ZD,
    sqb, sqh, sqn, svb, svh, svn, N, H, n_sel, nq, nk, block_q, has_lin,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAIR: tl.constexpr, STATE: tl.constexpr,
):
    """Linear branch of one query tile: O_l = phi(Q)(H_all - H_sel) / (phi(Q)(z_all - z_sel) + eps).
    STATE (CONFIG["lin_state"], the default): write the query block's complement state hd = H_all - H_sel
    (input dtype, D x D) and zd, and let the sparse launch finish the branch in its epilogue (no Q re-read,
    no O_l round trip).  Otherwise write O_l (a temporary for the sparse launch's mix) and 1/den.  If every
    block is selected (has_lin == 0) O_l and 1/den are exactly 0."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    qblk = (pid_m * BLOCK_M) // block_q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m_valid = offs_m < N
    row = bh * N + offs_m
    lut = LUT + (bh * nq + qblk) * n_sel
    # PHIK holds -phi(K) (_k_feats NEG): starting from H_all the loop ends on H_all - H_sel
    h_all = tl.load(HALL + bh * D * D + offs_d[:, None] * D + offs_d[None, :])
    acc_h, acc_z = _hsel(h_all, PHIK, V, ZB, lut, bh, b, h, svb, svh, svn, N, n_sel, nk, D, BLOCK_N, PAIR)
    hd = acc_h.to(Q.dtype.element_ty)
    zd = tl.load(ZALL + bh * D + offs_d) - acc_z
    if STATE:
        # a tile smaller than its routing block writes the same values as its sibling tiles
        sb = bh * nq + qblk
        tl.store(HD + (sb * D + offs_d[:, None]) * D + offs_d[None, :], hd)
        tl.store(ZD + sb * D + offs_d, zd)
    else:
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=m_valid[:, None], other=0.0)
        o_l, rden = _linear_output(q, hd, zd, has_lin)
        tl.store(OL + row[:, None] * D + offs_d[None, :], o_l.to(OL.dtype.element_ty), mask=m_valid[:, None])
        tl.store(RDEN + row, rden, mask=m_valid)


_FWD_RUNTIME = ["N", "H", "n_sel", "nq", "nk", "block_q", "qk_scale", "inv_n", "has_lin"]


@triton.jit(do_not_specialize=_FWD_RUNTIME)
def _fwd_sparse_kernel(
    Q, K, V, QQ, QS, KQ, KS, VQ, VMAX, KSUM, LUT, ALPHA,
    O, OL, LSE, HD, ZD, RDEN,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    N, H, n_sel, nq, nk, block_q, qk_scale, inv_n, npad, has_lin,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAIR: tl.constexpr, QUANT: tl.constexpr,
    FP8_EMU: tl.constexpr, SAVE: tl.constexpr, LIN_STATE: tl.constexpr,
):
    """Sparse branch of one query tile over its LUT row (FA2 online softmax in exp2), then the mix
    O = alpha*O_s + (1-alpha)*O_l.  SAVE: also the LSE (backward).

    LIN_STATE (CONFIG["lin_state"], the default): the linear launch left the routing block's complement
    state hd = H_all - H_sel and zd; this epilogue computes phi(Q), 1/den (written to RDEN) and adds
    (1-alpha) phi(Q) hd / den to alpha O_s in one MMA (phi(Q) scaled per row before the 16-bit cast).
    Otherwise O_l comes from the linear launch."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    qblk = (pid_m * BLOCK_M) // block_q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, BLOCK_N * PAIR)
    first = offs_c < BLOCK_N
    m_valid = offs_m < N
    row = bh * N + offs_m

    if QUANT == 0:
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    else:
        q = tl.load(QQ + (bh * N + offs_m[:, None]) * D + offs_d[None, :], mask=m_valid[:, None], other=0)
        q_scale = tl.load(QS + bh * nq + qblk)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    lut = LUT + (bh * nq + qblk) * n_sel
    for it in range(0, n_sel, PAIR):
        offs_n, n_valid, kb0, kb1 = _lut_offsets(lut, it, n_sel, N, offs_c, BLOCK_N, PAIR)
        if QUANT == 0:
            k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=n_valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
        else:
            kq = tl.load(KQ + (bh * N + offs_n[:, None]) * D + offs_d[None, :], mask=n_valid[:, None], other=0)
            ks0 = tl.load(KS + bh * nk + kb0)
            ks1 = tl.load(KS + bh * nk + kb1)
            kscale = tl.where(first, ks0, ks1) * q_scale
            s = tl.dot(q, tl.trans(kq), out_dtype=tl.int32).to(tl.float32) * kscale[None, :]
        s = tl.where(n_valid[None, :], s, float("-inf"))
        p, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc)
        if QUANT == 2:
            # VQ is (B*H, D, npad), zero-padded: unmasked, token-contiguous loads
            vq = tl.load(VQ + (bh * D + offs_d[None, :]) * npad + offs_n[:, None])
            acc = tl.dot(_to_fp8(p * 448.0, FP8_EMU), vq, acc)
        else:
            v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=n_valid[:, None], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc)

    o_s = acc / l_i[:, None]
    if QUANT == 2:
        vscale = tl.maximum(tl.load(VMAX + bh * D + offs_d), 1e-8) / 448.0
        o_s = o_s * (vscale / 448.0)[None, :]
    if SAVE:
        lse = m_i + tl.log2(l_i)
        if QUANT > 0:
            # the quantised logits used K - mean(K); the bf16 backward needs the LSE of the unshifted logits.
            meank = tl.load(KSUM + bh * D + offs_d) * inv_n
            qo = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=m_valid[:, None], other=0.0)
            lse += tl.sum(qo.to(tl.float32) * meank[None, :], axis=1) * qk_scale
        tl.store(LSE + row, lse, mask=m_valid)
    alpha = tl.load(ALPHA + h)
    if LIN_STATE:
        if QUANT == 0:
            qe = q
        else:
            qe = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=m_valid[:, None], other=0.0)
        sb = bh * nq + qblk
        phiq, rden = _phi_rden(qe, tl.load(ZD + sb * D + offs_d), has_lin)
        tl.store(RDEN + row, rden, mask=m_valid)
        hd = tl.load(HD + (sb * D + offs_d[:, None]) * D + offs_d[None, :])
        o = tl.dot((phiq * ((1.0 - alpha) * rden)[:, None]).to(hd.dtype), hd, alpha * o_s)
    else:
        o_l = tl.load(OL + row[:, None] * D + offs_d[None, :], mask=m_valid[:, None], other=0.0).to(tl.float32)
        o = alpha * o_s + (1.0 - alpha) * o_l
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], o.to(O.dtype.element_ty), mask=m_valid[:, None])


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "H"])
def _phi_rows(
    X, PHI, sxb, sxh, sxn, N, H,
    D: tl.constexpr, BLOCK: tl.constexpr,
):
    """phi(X) = softmax over the head dim of one tile of rows, stored (B*H, N, D) in X's dtype."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    valid = offs < N
    x = tl.load(X + b * sxb + h * sxh + offs[:, None] * sxn + offs_d[None, :], mask=valid[:, None], other=0.0)
    tl.store(PHI + (bh * N + offs[:, None]) * D + offs_d[None, :], _phi(x.to(tl.float32)).to(x.dtype), mask=valid[:, None])


@triton.jit(do_not_specialize=["N", "H"])
def _phi_to_psi(
    PHI, RDEN, ALPHA, N, H,
    D: tl.constexpr, BLOCK: tl.constexpr,
):
    """In place: phi(Q) -> psi = (1-alpha) * phi(Q) / den, the row scaling of the linear branch's
    gradient g = (1-alpha) dO / den moved onto phi(Q), so the backward's D x D reductions
    (A = sum psi^T dO) are plain load + MMA loops on two 16-bit tiles.  Reuses phi(Q)'s buffer."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    h = bh % H
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    valid = offs < N
    ptrs = PHI + (bh * N + offs[:, None]) * D + offs_d[None, :]
    phi = tl.load(ptrs, mask=valid[:, None], other=0.0)
    scale = (1.0 - tl.load(ALPHA + h)) * tl.load(RDEN + bh * N + offs, mask=valid, other=0.0)
    tl.store(ptrs, (phi.to(tl.float32) * scale[:, None]).to(phi.dtype), mask=valid[:, None])


@triton.jit(do_not_specialize=["N", "H", "nt"])
def _bwd_rows(
    PHIQ, DO, O, W, RDEN, ALPHA, DELTA, BP, DAP,
    sdb, sdh, sdn, sob, soh, son, N, H, nt,
    D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Per row of one query tile (one program each, no loop), from the output O (not O_s: O is saved by
    the next layer anyway) and w = rowsum(dO*O_l) from the dQ-linear launch, with u = (1-alpha) w and
    c = -u/den: delta = alpha*rowsum(dO*O_s) = rowsum(dO*O) - u.  Per-tile partials (summed by the caller,
    deterministic): b = sum c*phi(q) and the alpha-logit gradient
    alpha(1-alpha) sum dO*(O_s - O_l) = sum (1-alpha)*rowsum(dO*O) - u."""
    t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    alpha = tl.load(ALPHA + h)
    offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = offs_m < N
    row = bh * N + offs_m
    dof = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    of = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    r = tl.sum(dof * of, axis=1)
    u = (1.0 - alpha) * tl.load(W + row, mask=valid, other=0.0)
    cc = -u * tl.load(RDEN + row, mask=valid, other=0.0)
    tl.store(DELTA + row, r - u, mask=valid)
    tl.store(DAP + bh * nt + t, tl.sum((1.0 - alpha) * r - u, axis=0))
    phiq = tl.load(PHIQ + row[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    tl.store(BP + (bh * nt + t) * D + offs_d, tl.sum(cc[:, None] * phiq, axis=0))


@triton.jit(do_not_specialize=["N", "H", "nt", "nsplit"])
def _bwd_outer(
    PSI, DO, AP,
    sdb, sdh, sdn, N, H, nt, nsplit,
    D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Partial A = sum phi(Q)^T g = sum psi^T dO (g = (1-alpha) dO / den) over one contiguous run of query
    tiles (split-K GEMM; the caller sums the nsplit partials)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    per = tl.cdiv(nt, nsplit)
    acc = tl.zeros((D, D), dtype=tl.float32)
    for t in range(pid * per, tl.minimum(nt, pid * per + per)):
        offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = offs_m < N
        row = bh * N + offs_m
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=valid[:, None], other=0.0)
        psi = tl.load(PSI + row[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0)
        acc = tl.dot(tl.trans(psi), do, acc)
    tl.store(AP + (bh * nsplit + pid) * D * D + offs_d[:, None] * D + offs_d[None, :], acc)


_BWD_RUNTIME = ["N", "H", "n_sel", "nq", "nk", "block_q", "qk_scale", "sm_scale"]


@triton.jit(do_not_specialize=["N", "H", "n_sel", "nq", "nk", "block_q"])
def _bwd_dq_lin_kernel(
    V, DO, DQ, ZB, LUT, W, RDEN, HALL, ZALL, ALPHA, PHIQ, PHIK,
    svb, svh, svn, sdb, sdh, sdn, sxb, sxh, sxn, N, H, n_sel, nq, nk, block_q,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAIR: tl.constexpr,
):
    """Linear part of dQ (writes DQ): dphi(q) = g (H_all - H_sel)^T + c (z_all - z_sel), through phi's
    softmax Jacobian; g = (1-alpha) dO / den.  O_l is not saved by the forward: its numerator
    phi(Q)(H_all - H_sel) is recomputed here (one MMA) to give w = rowsum(dO*O_l), written for the later
    launches (u = (1-alpha) w, c = -u/den)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    qblk = (pid_m * BLOCK_M) // block_q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m_valid = offs_m < N
    row = bh * N + offs_m
    lut = LUT + (bh * nq + qblk) * n_sel
    acc_h, acc_z = _hsel(tl.zeros((D, D), dtype=tl.float32), PHIK, V, ZB, lut, bh, b, h, svb, svh, svn, N, n_sel,
                         nk, D, BLOCK_N, PAIR)
    hd = (tl.load(HALL + bh * D * D + offs_d[:, None] * D + offs_d[None, :]) - acc_h).to(DO.dtype.element_ty)
    zd = tl.load(ZALL + bh * D + offs_d) - acc_z
    alpha = tl.load(ALPHA + h)
    rden = tl.load(RDEN + row, mask=m_valid, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    phiq = tl.load(PHIQ + row[:, None] * D + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    num = tl.dot(phiq, hd)  # the forward's O_l * den, same operands
    w = rden * tl.sum(do.to(tl.float32) * num, axis=1)
    cc = -(1.0 - alpha) * rden * w
    tl.store(W + row, w, mask=m_valid)
    g = (do.to(tl.float32) * ((1.0 - alpha) * rden)[:, None]).to(do.dtype)
    dphi = tl.dot(g, tl.trans(hd)) + cc[:, None] * zd[None, :]
    phiqf = phiq.to(tl.float32)
    dq = phiqf * (dphi - tl.sum(phiqf * dphi, axis=1)[:, None])
    tl.store(DQ + b * sxb + h * sxh + offs_m[:, None] * sxn + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=m_valid[:, None])


@triton.jit(do_not_specialize=_BWD_RUNTIME)
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LUT, LSE, DELTA, ALPHA,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sxb, sxh, sxn,
    N, H, n_sel, nq, nk, block_q, qk_scale, sm_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAIR: tl.constexpr,
):
    """Sparse part of dQ over the LUT (FA2), added to the linear part already in DQ."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    qblk = (pid_m * BLOCK_M) // block_q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, BLOCK_N * PAIR)
    m_valid = offs_m < N
    row = bh * N + offs_m
    alpha = tl.load(ALPHA + h)
    dq_ptrs = DQ + b * sxb + h * sxh + offs_m[:, None] * sxn + offs_d[None, :]
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    lse = tl.load(LSE + row, mask=m_valid, other=0.0)
    delta = tl.load(DELTA + row, mask=m_valid, other=0.0)
    do_s = (do.to(tl.float32) * alpha).to(do.dtype)
    dq = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    lut = LUT + (bh * nq + qblk) * n_sel
    for it in range(0, n_sel, PAIR):
        offs_n, n_valid, kb0, kb1 = _lut_offsets(lut, it, n_sel, N, offs_c, BLOCK_N, PAIR)
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where(n_valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do_s, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    dq = dq * sm_scale + tl.load(dq_ptrs, mask=m_valid[:, None], other=0.0).to(tl.float32)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_valid[:, None])


@triton.jit(do_not_specialize=["N", "H", "nk"])
def _bwd_dkdv_lin_kernel(
    V, DO, DK, DV, KOFF, KQT, W, AALL, BALL, PSI, PHIK,
    svb, svh, svn, sdb, sdh, sdn, sxb, sxh, sxn, syb, syh, syn, N, H, nk,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Linear part of dK, dV for one key block (writes DK, DV): over the query tiles that selected it,
    A_sel = sum phi(Q)^T g = sum psi^T dO and b_sel = sum c*phi(Q) = -sum w*psi (both on the tensor
    cores: the loop only loads two 16-bit tiles and a row vector); dV = phi(K)(A_all - A_sel),
    dphi(K) = V (A_all - A_sel)^T + (b_all - b_sel), through phi's Jacobian."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_m0 = tl.arange(0, BLOCK_M)
    n_valid = offs_n < N
    offs_w = tl.arange(0, 16)  # the smallest MMA width: column 0 carries -w, the rest are zero
    acc_a = tl.zeros((D, D), dtype=tl.float32)
    acc_b = tl.zeros((D, 16), dtype=tl.float32)
    start = tl.load(KOFF + bh * nk + pid_n)
    end = tl.load(KOFF + bh * nk + pid_n + 1)
    for idx in range(start, end):
        t = tl.load(KQT + idx)
        offs_m = t * BLOCK_M + offs_m0
        m_valid = offs_m < N
        row = bh * N + offs_m
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=m_valid[:, None], other=0.0)
        psi = tl.load(PSI + row[:, None] * D + offs_d[None, :], mask=m_valid[:, None], other=0.0)
        w = tl.load(W + row, mask=m_valid, other=0.0)
        acc_a = tl.dot(tl.trans(psi), do, acc_a)
        wmat = tl.where(offs_w[None, :] == 0, -w[:, None], 0.0).to(psi.dtype)
        acc_b = tl.dot(tl.trans(psi), wmat, acc_b)
    ad = tl.load(AALL + bh * D * D + offs_d[:, None] * D + offs_d[None, :]) - acc_a
    bd = tl.load(BALL + bh * D + offs_d) - tl.sum(acc_b, axis=1)
    phik = tl.load(PHIK + (bh * N + offs_n[:, None]) * D + offs_d[None, :], mask=n_valid[:, None], other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=n_valid[:, None], other=0.0)
    adl = ad.to(v.dtype)  # 16-bit operands: dK, dV are 16-bit; fp32 operands spilled here
    dv = tl.dot(phik, adl)
    tl.store(DV + b * syb + h * syh + offs_n[:, None] * syn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=n_valid[:, None])
    dphi = tl.dot(v, tl.trans(adl)) + bd[None, :]
    phikf = phik.to(tl.float32)
    dk = phikf * (dphi - tl.sum(phikf * dphi, axis=1)[:, None])
    tl.store(DK + b * sxb + h * sxh + offs_n[:, None] * sxn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=n_valid[:, None])


@triton.jit(do_not_specialize=_BWD_RUNTIME + ["nt"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, KOFF, KQT, LSE, DELTA, ALPHA,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sxb, sxh, sxn, syb, syh, syn,
    N, H, n_sel, nq, nk, block_q, qk_scale, sm_scale, nt,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr,
):
    """Sparse part of dK and/or dV for one key block over the query tiles that selected it (inverted
    index KOFF/KQT), added to the linear part already in DK/DV.  DO_DK / DO_DV pick the accumulators:
    one launch with both, or two launches with one fp32 accumulator each."""
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
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=n_valid[:, None], other=0.0)
    if DO_DK:
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        dk = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    if DO_DV:
        dv = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    start = tl.load(KOFF + bh * nk + pid_n)
    end = tl.load(KOFF + bh * nk + pid_n + 1)
    for idx in range(start, end):
        t = tl.load(KQT + idx)
        offs_m = t * BLOCK_M + offs_m0
        m_valid = offs_m < N
        row = bh * N + offs_m
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=m_valid[:, None], other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=m_valid[:, None], other=0.0)
        lse = tl.load(LSE + row, mask=m_valid, other=0.0)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
        p_t = tl.where(m_valid[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
        if DO_DV:
            dv = tl.dot(p_t.to(do.dtype), do, dv)
        if DO_DK:
            delta = tl.load(DELTA + row, mask=m_valid, other=0.0)
            dp_t = tl.dot(v, tl.trans(do))
            ds_t = p_t * (dp_t * alpha - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk)
    if DO_DK:
        dk = dk * sm_scale + tl.load(dk_ptrs, mask=n_valid[:, None], other=0.0).to(tl.float32)
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_valid[:, None])
    if DO_DV:
        dv = dv * alpha + tl.load(dv_ptrs, mask=n_valid[:, None], other=0.0).to(tl.float32)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_valid[:, None])
