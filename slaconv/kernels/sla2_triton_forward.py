"""Triton kernels of the SLA2 forward: router top-k, pre-passes, the linear launch and the sparse launch.

Conventions and shared device functions: ``sla2_triton_common.py``; launched by ``sla2_triton.forward``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import sla2_triton_common as common

LINEAR_EPS = tl.constexpr(1e-6)  # equal to reference.LINEAR_EPS
FP8_MAX = tl.constexpr(448.0)  # largest finite FP8 e4m3 value
INT8_MAX = tl.constexpr(127.0)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _fp8_preround(x):
    """Round fp32 to the nearest FP8 e4m3 value (as fp32).  Only used under TRITON_INTERPRET: the
    interpreter's fp32->fp8 cast drops the carry when the mantissa rounds up to the next power of two
    (124.3 -> 64 instead of 128, Triton 3.9); pre-rounded values convert exactly.  The GPU cast is
    hardware round-to-nearest and skips this."""
    exponent = tl.maximum(tl.floor(tl.log2(tl.maximum(tl.abs(x), 1e-30))), -6.0)
    ulp = tl.exp2(exponent - 3.0)
    return tl.floor(x / ulp + 0.5) * ulp


@triton.jit
def _to_fp8(x, EMULATE: tl.constexpr):
    if EMULATE:
        x = _fp8_preround(x)
    return x.to(tl.float8e4nv)


@triton.jit
def _int8_tile(x):
    """Symmetric INT8 of an fp32 tile with one scale (amax / 127), rounding half away from zero:
    returns the int8 tile and the scale."""
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale = tl.maximum(amax, 1e-8) / INT8_MAX
    y = x / scale
    y = tl.where(y >= 0, y + 0.5, y - 0.5)
    y = tl.minimum(tl.maximum(y, -INT8_MAX), INT8_MAX)
    return y.to(tl.int32).to(tl.int8), scale


@triton.jit
def softmax_step(s, m_i, l_i, acc):
    """One online-softmax step on logits ``s`` (log2 units, masked to -inf): returns the block's
    probabilities P and the updated running max, row sum and rescaled accumulator (P @ V still to add)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    rescale = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, m_new, l_i * rescale + tl.sum(p, axis=1), acc * rescale[:, None]


@triton.jit
def lse_step(s, m_i, l_i):
    """One step of a running log2-sum-exp over the columns of ``s`` (rows x chunk, log2 units), per row; a finite
    start for ``m_i`` keeps rows whose chunk is all -inf at exp2(-inf - m) = 0, never nan."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    return m_new, l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)


@triton.jit
def lse_total(m_i, l_i):
    """The log2-sum-exp of :func:`lse_step`'s running state; -inf for a row that counted nothing (l_i >= 1 once
    any column counted: its max term is exp2(0))."""
    return tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1.0)), float("-inf"))


@triton.jit
def _psi(phi_q, alpha, Z_REST, INV_DEN, bh, state, rows, row_valid, N, has_lin, D: tl.constexpr):
    """psi = (1 - alpha) phi(Q) / den (fp32) from the features of a query tile, den = phi(Q) z_rest + eps
    (1/den = 0 if every block is selected); stores 1/den per row.  ``alpha``: a scalar or one per row."""
    den = tl.sum(phi_q * tl.load(Z_REST + state * D + tl.arange(0, D))[None, :], axis=1) + LINEAR_EPS
    inv_den = tl.where(has_lin != 0, 1.0 / den, 0.0)
    tl.store(INV_DEN + bh * N + rows, inv_den, mask=row_valid)
    return phi_q * ((1.0 - alpha) * inv_den)[:, None]


@triton.jit
def scaled_phi_rows(q16, ALPHA, Z_REST, INV_DEN, h, bh, state, rows, row_valid, N, has_lin, D: tl.constexpr):
    """The linear branch's row factor of a query tile with softmax features and one alpha per head,
    psi = (1 - alpha) phi(Q) / den (fp32), and alpha; stores 1/den per row.  ``q16`` is the 16-bit Q tile,
    ``state`` its routing block's index."""
    alpha = tl.load(ALPHA + h)
    return _psi(common.phi(q16.to(tl.float32)), alpha, Z_REST, INV_DEN, bh, state, rows, row_valid, N, has_lin,
                D), alpha


@triton.jit
def mix_and_store(o_s, phi_q, alpha, H_REST, Z_REST, O, INV_DEN, bh, state, rows, row_valid, stride_on, N, has_lin,
                  D: tl.constexpr, MIX_ROWS: tl.constexpr):
    """The sparse launch's epilogue, after its loop: finish the linear branch from the routing block's state
    and mix, O = alpha O_s + psi H_rest in one MMA (psi: :func:`_psi` of the features ``phi_q``); store O
    (``O`` points at this (batch, head)) and 1/den per row.  ``o_s`` is the normalised sparse output,
    ``alpha`` this head's scalar or, with MIX_ROWS, one per row."""
    psi = _psi(phi_q, alpha, Z_REST, INV_DEN, bh, state, rows, row_valid, N, has_lin, D)
    h_rest = common.load_square(H_REST + state * D * D, D)
    if MIX_ROWS:
        o_sparse = alpha[:, None] * o_s
    else:
        o_sparse = alpha * o_s
    o = tl.dot(psi.to(h_rest.dtype), h_rest, o_sparse)
    common.store_rows(O, rows, stride_on, row_valid, o, D)


@triton.jit
def row_mix_ratio(lse_sel, LSE_TAIL, alpha_logit, per_row, row_valid, has_lin, MIX_ROWS: tl.constexpr = 1):
    """alpha per query row: sigmoid(LSE_sel - LSE_tail + alpha_logit) with both log-sum-exps in log2 units
    (LSE_tail of the blocks the row's query block did not select, from :func:`tail_lse_kernel`), or with
    MIX_ROWS == 2 (``mixing: query-linear``) sigmoid of the row's whole logit, which LSE_TAIL then holds; 1
    when every block is selected."""
    if MIX_ROWS == 2:
        logit = tl.load(LSE_TAIL + per_row, mask=row_valid, other=0.0)
    else:
        lse_tail = tl.load(LSE_TAIL + per_row, mask=row_valid, other=float("-inf"))
        logit = (lse_sel - lse_tail) * LN2 + alpha_logit
    return tl.where(has_lin != 0, 1.0 / (1.0 + tl.exp(-logit)), 1.0)


# --------------------------------------------------------------------------------------------------
# router top-k
# --------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["nk", "H", "inv_n"])
def router_key_proj(K_MEAN, K_SUM, W_K, K_PROJ, nk, H, inv_n, D: tl.constexpr, ROWS: tl.constexpr,
                    CHUNK: tl.constexpr):
    """The router's key side for ``ROWS`` key blocks: (mean_j(K) - mean(K)) W_k in fp32 into K_PROJ (B*H, nk, D).

    K_MEAN (B*H, nk, D) fp32 holds the block means, K_SUM (B*H, D) fp32 the token sums (times ``inv_n``: the
    token mean), W_K (H, D, D) this head's projection in any float dtype."""
    common.check_head_dim(D)
    bh = tl.program_id(1).to(tl.int64)
    h = bh % H
    offs_d = tl.arange(0, D)
    rows, valid = common.block_rows(tl.program_id(0), ROWS, nk)
    k_mean = common.load_rows(K_MEAN + bh * nk * D, rows, D, valid, D)
    k_centred = k_mean - tl.load(K_SUM + bh * D + offs_d)[None, :] * inv_n
    for c in range(0, D, CHUNK):  # over output columns: one (D, CHUNK) slice of the weight at a time
        cols = c + tl.arange(0, CHUNK)
        w = tl.load(W_K + h * D * D + offs_d[:, None] * D + cols[None, :]).to(tl.float32)
        proj = tl.dot(k_centred, w, input_precision="tf32x3")
        tl.store(K_PROJ + (bh * nk + rows[:, None]) * D + cols[None, :], proj, mask=valid[:, None])


@triton.jit(do_not_specialize=["nq", "nk", "n_sel", "kept_start", "kept_end", "H"])
def router_topk(Q_MEAN, W_Q, K_PROJ, SCORES, LUT, nq, nk, n_sel, kept_start, kept_end, H, D: tl.constexpr,
                ROWS: tl.constexpr, NK_P: tl.constexpr, KEYS: tl.constexpr, CHUNK: tl.constexpr,
                SELECT_ROWS: tl.constexpr):
    """The router for ``ROWS`` query blocks: block scores (mean_i(Q) W_q) K_PROJ^T in fp32 (1/sqrt(D) left
    out: it keeps the order), then each row's ``n_sel`` highest key blocks, written in ascending order to
    LUT (B*H, nq, n_sel).

    The scores go through this program's (ROWS, nk) slice of SCORES, written ``KEYS`` key blocks at a time
    and read back ``SELECT_ROWS`` rows at a time, so only those rows' integer keys are ever held whole.  The
    n_sel-th largest score of a row is found by a 32-step bisection on order-preserving integer keys (cost
    independent of n_sel, no sort); blocks above it are taken, ties at it by lowest index; a prefix sum gives
    each selected block its slot, so the row comes out sorted.  Blocks in ``[kept_start, kept_end)`` get the
    largest key, above every score's, so they are always taken."""
    common.check_head_dim(D)
    bh = tl.program_id(1).to(tl.int64)
    h = bh % H
    offs_d = tl.arange(0, D)
    rows, row_valid = common.block_rows(tl.program_id(0), ROWS, nq)
    q_proj = tl.zeros((ROWS, D), dtype=tl.float32)
    for c in range(0, D, CHUNK):  # over the contraction, so neither operand is held whole
        inner = c + tl.arange(0, CHUNK)
        q_mean = tl.load(Q_MEAN + (bh * nq + rows[:, None]) * D + inner[None, :], mask=row_valid[:, None],
                         other=0.0)
        w = tl.load(W_Q + h * D * D + inner[:, None] * D + offs_d[None, :]).to(tl.float32)
        q_proj = tl.dot(q_mean, w, q_proj, input_precision="tf32x3")
    slab = SCORES + (bh * tl.num_programs(0) + tl.program_id(0)) * ROWS * nk
    for k0 in range(0, NK_P, KEYS):
        offs = k0 + tl.arange(0, KEYS)
        k_proj_t = tl.load(K_PROJ + (bh * nk + offs[None, :]) * D + offs_d[:, None], mask=(offs < nk)[None, :],
                           other=0.0)
        scores = tl.dot(q_proj, k_proj_t, input_precision="tf32x3")
        tl.store(slab + tl.arange(0, ROWS)[:, None] * nk + offs[None, :], scores, mask=(offs < nk)[None, :])
    tl.debug_barrier()  # the slab's stores by every thread before any thread reads a whole row back
    for r0 in range(0, ROWS, SELECT_ROWS):
        sub = tl.program_id(0) * ROWS + r0 + tl.arange(0, SELECT_ROWS)
        _select_top_k(slab + r0 * nk, LUT + (bh * nq + sub[:, None]) * n_sel, sub < nq, nk, n_sel,
                      kept_start, kept_end, SELECT_ROWS, NK_P)


@triton.jit
def _select_top_k(SCORES, LUT_ROWS, row_valid, nk, n_sel, kept_start, kept_end, ROWS: tl.constexpr,
                  NK_P: tl.constexpr):
    """Rows of scores (row stride nk) -> each row's n_sel highest key blocks, ascending, at LUT_ROWS."""
    offs_k = tl.arange(0, NK_P)
    bits = tl.load(SCORES + tl.arange(0, ROWS)[:, None] * nk + offs_k[None, :], mask=(offs_k < nk)[None, :],
                   other=0.0).to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # float order == integer order
    # the extremes are no float's key (-2^31 only a negative NaN's, 2^31 - 1 none): padding below, kept above
    key = tl.where((offs_k < nk)[None, :], key, -(2**31))
    key = tl.where(((offs_k >= kept_start) & (offs_k < kept_end))[None, :], 2**31 - 1, key)
    lo = tl.full((ROWS,), -(2**31), tl.int64)  # count(key >= lo) >= n_sel always holds
    hi = tl.full((ROWS,), 2**31 - 1, tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        enough = tl.sum((key >= mid.to(tl.int32)[:, None]).to(tl.int32), axis=1) >= n_sel
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    cut = lo.to(tl.int32)[:, None]
    above = key > cut
    tied = key == cut
    room = n_sel - tl.sum(above.to(tl.int32), axis=1)
    selected = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=1) <= room[:, None]))
    slot = tl.cumsum(selected.to(tl.int32), axis=1) - 1
    tl.store(LUT_ROWS + slot, offs_k[None, :] + 0 * slot, mask=selected & row_valid[:, None])


# --------------------------------------------------------------------------------------------------
# pre-passes over K, V and Q
# --------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "H", "nq", "scale"])
def q_prepass(
    Q, Q_MEAN, Q_INT8, Q_SCALE, W_SIGNED, PHI_Q, ALPHA_W, ALPHA_LOGIT, ROW_LOGITS,
    stride_qb, stride_qh, stride_qn, N, H, nq, scale,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, QUANT: tl.constexpr, HEDGEHOG: tl.constexpr = False,
    ROW_TERMS: tl.constexpr = False,
):
    """Per query block: its mean (for the router), if QUANT INT8 of Q * scale with one scale per block,
    if HEDGEHOG the Hedgehog features of Q (:func:`common.hedgehog`, this head's signed weights
    W_SIGNED (H, D, D)) stored in Q's dtype for the sparse launch's epilogue, and if ROW_TERMS each row's
    alpha term q . w + a_h into ROW_LOGITS (B*H, N) fp32 (ALPHA_W (B*H, D) fp32, the head's weight already
    divided by sqrt(D); ALPHA_LOGIT (H,) fp32): ``mixing="query-linear"``'s whole alpha logit, or with a_h = 0
    ``"query-block"``'s per-row term beside its pooled tail."""
    qb, bh, b, h = common.program_coords(H, D, BLOCK_Q, BLOCK_Q)
    Q += b * stride_qb + h * stride_qh
    offs_d = tl.arange(0, D)
    rows, valid = common.block_rows(qb, BLOCK_Q, N)
    q16 = common.load_rows(Q, rows, stride_qn, valid, D)
    q = q16.to(tl.float32)
    count = tl.minimum(N - qb * BLOCK_Q, BLOCK_Q).to(tl.float32)
    tl.store(Q_MEAN + (bh * nq + qb) * D + offs_d, tl.sum(q, axis=0) / count)
    if ROW_TERMS:  # before the rest, so the fp32 tile is not held through the Hedgehog product
        w = tl.load(ALPHA_W + bh * D + offs_d)
        logits = tl.sum(q * w[None, :], axis=1) + tl.load(ALPHA_LOGIT + h)
        tl.store(ROW_LOGITS + bh * N + rows, logits, mask=valid)
    if QUANT > 0:
        q_int8, q_scale = _int8_tile(q * scale)
        common.store_rows(Q_INT8 + bh * N * D, rows, D, valid, q_int8, D)
        tl.store(Q_SCALE + bh * nq + qb, q_scale)
    if HEDGEHOG:
        common.store_rows(PHI_Q + bh * N * D, rows, D, valid, common.hedgehog(q16, W_SIGNED + h * D * D, D), D)


@triton.jit(do_not_specialize=["N", "H", "nk"])
def k_feats(
    K, V, K_MEAN, K_SUM, Z_BLOCK, V_ABSMAX, PHI_K, W_SIGNED,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, N, H, nk,
    D: tl.constexpr, BLOCK_N: tl.constexpr, NEED_V_ABSMAX: tl.constexpr, NEGATE_PHI: tl.constexpr,
    HEDGEHOG: tl.constexpr = False,
):
    """Per key block, one program each (no loop, so the pass runs at full occupancy): the block's mean of K
    (router) and sum (for mean(K)), phi(K) (stored), its column sums z (Z_BLOCK) and, if NEED_V_ABSMAX,
    the block's max|V| per channel.  The caller reduces the per-block rows (deterministic torch sums).
    NEGATE_PHI (the forward): PHI_K holds -phi(K), so the linear loop accumulates H_all - H_sel directly;
    z per block stays positive.  phi is softmax over the head dim, or with HEDGEHOG the Hedgehog map of this
    head's signed weights W_SIGNED (H, D, D) (:func:`common.features`)."""
    kb, bh, b, h = common.program_coords(H, D, BLOCK_N, BLOCK_N)
    offs_d = tl.arange(0, D)
    rows, valid = common.block_rows(kb, BLOCK_N, N)
    k = common.load_rows(K + b * stride_kb + h * stride_kh, rows, stride_kn, valid, D)
    k32 = k.to(tl.float32)
    count = tl.minimum(N - kb * BLOCK_N, BLOCK_N).to(tl.float32)
    block_sum = tl.sum(k32, axis=0)
    stats = (bh * nk + kb) * D + offs_d
    tl.store(K_SUM + stats, block_sum)
    tl.store(K_MEAN + stats, block_sum / count)
    phi_k32 = tl.where(valid[:, None], common.features(k, W_SIGNED + h * D * D, HEDGEHOG, D), 0.0)
    if NEGATE_PHI:
        stored = -phi_k32
    else:
        stored = phi_k32
    common.store_rows(PHI_K + bh * N * D, rows, D, valid, stored.to(k.dtype), D)
    # z of the 16-bit phi(K) the loops multiply with
    tl.store(Z_BLOCK + stats, tl.sum(phi_k32.to(k.dtype).to(tl.float32), axis=0))
    if NEED_V_ABSMAX:
        v = common.load_rows(V + b * stride_vb + h * stride_vh, rows, stride_vn, valid, D)
        tl.store(V_ABSMAX + stats, tl.max(tl.abs(v.to(tl.float32)), axis=0))


@triton.jit(do_not_specialize=["N", "H", "nk", "n_splits"])
def kv_outer(
    NEG_PHI_K, V, H_PARTIAL,
    stride_vb, stride_vh, stride_vn, N, H, nk, n_splits,
    D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Partial H_all = sum phi(K)^T V over one contiguous run of key blocks (a split-K GEMM; the caller
    sums the n_splits partials)."""
    split, bh, b, h = common.program_coords(H, D, BLOCK_N, BLOCK_N)
    V += b * stride_vb + h * stride_vh
    acc = common.split_outer_product(NEG_PHI_K + bh * N * D, V, stride_vn, nk, n_splits, N, D, BLOCK_N)
    # the buffer holds -phi(K) (k_feats NEGATE_PHI): store the partial of +H
    common.store_square(H_PARTIAL + (bh * n_splits + split) * D * D, -acc, D)


@triton.jit(do_not_specialize=["N", "H", "nk", "n_splits"])
def key_pass(
    K, V, K_MEAN, H_PARTIAL, K_SUM_PARTIAL, Z_PARTIAL, V_ABSMAX_PARTIAL, W_SIGNED,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, N, H, nk, n_splits,
    D: tl.constexpr, BLOCK_N: tl.constexpr, NEED_V_ABSMAX: tl.constexpr, HEDGEHOG: tl.constexpr = False,
):
    """``k_feats`` and ``kv_outer`` in one pass, for a forward whose linear branch runs over every key block:
    that branch needs phi(K) only inside H_all and z_all, so K and V are read once and phi(K) is never
    written.  Over one contiguous run of key blocks (split ``program_id(0)`` of ``n_splits``): each block's
    mean of K (router); this split's partial H = sum phi(K)^T V, token sums of K (for mean(K)) and of phi(K)
    (z) and, if NEED_V_ABSMAX, max|V| per channel.  The caller reduces the partials (deterministic torch
    sums)."""
    split, bh, b, h = common.program_coords(H, D, BLOCK_N, BLOCK_N)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    offs_d = tl.arange(0, D)
    blocks_per_split = tl.cdiv(nk, n_splits)
    first = split * blocks_per_split
    # Sums over a block's rows are MMAs with a ones operand, and max|V| a running elementwise max: no
    # reduction across warps inside the loop.  The 16 rows of a ones-MMA result are equal; row 0 is stored.
    ones_rows = tl.full((16, BLOCK_N), 1.0, K.dtype.element_ty)
    ones_cols = tl.full((BLOCK_N, 16), 1.0, K.dtype.element_ty)
    first_row = (tl.arange(0, 16) == 0)[:, None]
    acc_h = tl.zeros((D, D), dtype=tl.float32)
    acc_z = tl.zeros((D, 16), dtype=tl.float32)
    acc_k = tl.zeros((16, D), dtype=tl.float32)
    v_absmax = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    for block in range(first, tl.minimum(nk, first + blocks_per_split)):
        rows, valid = common.block_rows(block, BLOCK_N, N)
        k = common.load_rows(K, rows, stride_kn, valid, D)
        v = common.load_rows(V, rows, stride_vn, valid, D)
        block_sum = tl.dot(ones_rows, k)
        acc_k += block_sum
        count = tl.minimum(N - block * BLOCK_N, BLOCK_N).to(tl.float32)
        tl.store(K_MEAN + (bh * nk + block) * D + offs_d[None, :] + 0 * first_row, block_sum / count, mask=first_row)
        # the 16-bit phi(K) the MMA multiplies with; z sums the same 16-bit values (as k_feats' z)
        phi_k_t = tl.trans(tl.where(valid[:, None], common.features(k, W_SIGNED + h * D * D, HEDGEHOG, D),
                                    0.0).to(k.dtype))
        acc_h = tl.dot(phi_k_t, v, acc_h)
        acc_z = tl.dot(phi_k_t, ones_cols, acc_z)
        if NEED_V_ABSMAX:
            v_absmax = tl.maximum(v_absmax, tl.abs(v.to(tl.float32)))
    partial = bh * n_splits + split
    common.store_square(H_PARTIAL + partial * D * D, acc_h, D)
    tl.store(K_SUM_PARTIAL + partial * D + offs_d[None, :] + 0 * first_row, acc_k, mask=first_row)
    tl.store(Z_PARTIAL + partial * D + offs_d, tl.sum(acc_z, axis=1) / 16)
    if NEED_V_ABSMAX:
        tl.store(V_ABSMAX_PARTIAL + partial * D + offs_d, tl.max(v_absmax, axis=0))


@triton.jit(do_not_specialize=["N", "H", "nk", "inv_n"])
def kv_quant(
    K, V, K_SUM, V_ABSMAX, K_INT8, K_SCALE, V_FP8,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, N, H, nk, npad, inv_n,
    D: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr, FP8_EMULATE: tl.constexpr,
):
    """INT8 of the smoothed K - mean(K) (one scale per key block); for QUANT == 2 also FP8 e4m3 of
    V / (max|V|[channel] / 448), stored (B*H, D, npad) token-contiguous (the K-major operand FP8 MMAs
    want for P @ V), zero-padded to whole key blocks so the sparse loop loads it unmasked."""
    kb, bh, b, h = common.program_coords(H, D, BLOCK_N, BLOCK_N)
    offs_d = tl.arange(0, D)
    rows, valid = common.block_rows(kb, BLOCK_N, N)
    k = common.load_rows(K + b * stride_kb + h * stride_kh, rows, stride_kn, valid, D)
    k_mean = tl.load(K_SUM + bh * D + offs_d) * inv_n
    k_smooth = tl.where(valid[:, None], k.to(tl.float32) - k_mean[None, :], 0.0)
    k_int8, k_scale = _int8_tile(k_smooth)
    common.store_rows(K_INT8 + bh * N * D, rows, D, valid, k_int8, D)
    tl.store(K_SCALE + bh * nk + kb, k_scale)
    if QUANT == 2:
        v = common.load_rows(V + b * stride_vb + h * stride_vh, rows, stride_vn, valid, D)
        v_scale = tl.maximum(tl.load(V_ABSMAX + bh * D + offs_d), 1e-8) / FP8_MAX
        v_scaled = tl.minimum(tl.maximum(v.to(tl.float32) / v_scale[None, :], -FP8_MAX), FP8_MAX)
        v_scaled = tl.where(valid[:, None], v_scaled, 0.0)
        tl.store(V_FP8 + (bh * D + offs_d[None, :]) * npad + rows[:, None], _to_fp8(v_scaled, FP8_EMULATE))


@triton.jit(do_not_specialize=["N", "H", "nq", "nk", "block_q", "block_k", "qk_scale"])
def tail_lse_kernel(
    Q, K_MEAN, SELECTED, K_SUM, LSE_TAIL,
    stride_qb, stride_qh, stride_qn, N, H, nq, nk, block_q, block_k, qk_scale, inv_n,
    D: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, SHIFTED: tl.constexpr,
):
    """LSE_tail per query row of one tile (log2 units): the log-sum-exp over the key blocks j its query block
    did *not* select of q . kbar_j / sqrt(D) + ln n_j (kbar_j the block's mean key, n_j its tokens), the
    mass estimate of per-query mixing; -inf when every block is selected.  CHUNK key blocks per step, one
    (BLOCK_M x D) x (D x CHUNK) MMA each: the whole pass is 1/block_k of a dense Q K^T.  SELECTED is the
    (B*H*nq, nk) int8 selection table of the LUT; K_MEAN the (B*H, nk, D) block means minus mean(K), in Q's
    dtype, so the MMA gives the logits in the frame of K - mean(K).  SHIFTED (the low-bit modes, whose sparse
    loop sees K - mean(K)) keeps that frame; otherwise q . mean(K) log2(e)/sqrt(D) is added back in fp32."""
    tile, bh, b, h = common.program_coords(H, D, BLOCK_M, BLOCK_M)
    offs_d = tl.arange(0, D)
    rows, row_valid = common.block_rows(tile, BLOCK_M, N)
    q = common.load_rows(Q + b * stride_qb + h * stride_qh, rows, stride_qn, row_valid, D)
    selected_row = SELECTED + (bh * nq + (tile * BLOCK_M) // block_q) * nk
    # the frame shift q . mean(K), taken before the loop: after it, q in fp32 would be live beside the
    # (BLOCK_M x CHUNK) logits and spill at CHUNK = 128
    frame_shift = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if not SHIFTED:
        k_token_mean = tl.load(K_SUM + bh * D + offs_d) * inv_n
        frame_shift = tl.sum(q.to(tl.float32) * k_token_mean[None, :], axis=1) * qk_scale
    # a finite start: a chunk with every block selected leaves exp2(-inf - m) = 0, never nan
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, nk, CHUNK):
        blocks = start + tl.arange(0, CHUNK)
        exists = blocks < nk
        k_bar = tl.load(K_MEAN + (bh * nk + blocks)[:, None] * D + offs_d[None, :], mask=exists[:, None], other=0.0)
        rest = (tl.load(selected_row + blocks, mask=exists, other=1) == 0) & exists
        log2_count = tl.log2(tl.maximum(tl.minimum(N - blocks * block_k, block_k), 1).to(tl.float32))
        s = tl.dot(q, tl.trans(k_bar.to(q.dtype))) * qk_scale + log2_count[None, :]
        s = tl.where(rest[None, :], s, float("-inf"))
        m_i, l_i = lse_step(s, m_i, l_i)
    lse = lse_total(m_i, l_i) + frame_shift
    tl.store(LSE_TAIL + bh * N + rows, lse, mask=row_valid)


@triton.jit(do_not_specialize=["N", "nq", "nk", "block_k", "qk_scale"])
def block_tail_lse_kernel(
    Q_MEAN, K_MEAN, SELECTED, ROW_LOGITS, LSE_TAIL, N, nq, nk, block_k, qk_scale,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr,
):
    """``mixing="query-block"``'s per-row input to the sparse launch, for every row of GROUP query blocks (log2
    units): LSE_pool - ROW_LOGITS[row] log2(e), where LSE_pool is the log-sum-exp over the key blocks j a
    query block did *not* select of qbar . kbar_j / sqrt(D) + ln n_j (qbar the block's mean query, Q_MEAN
    (B*H, nq, D) fp32; kbar_j K_MEAN (B*H, nk, D) fp32; n_j the block's tokens), -inf when every block is
    selected, and ROW_LOGITS (B*H, N) each row's q . w / sqrt(D) (natural units) from the Q pre-pass.
    SELECTED is the (B*H*nq, nk) int8 selection table of the LUT.  A group of query blocks shares each chunk
    of block means (one (GROUP x D) x (D x CHUNK) product in fp32): one program per query block would read
    every block mean once per query block."""
    group, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, D)
    q_blocks = group * GROUP + tl.arange(0, GROUP)
    q_valid = q_blocks < nq
    q_bar = tl.load(Q_MEAN + (bh * nq + q_blocks)[:, None] * D + offs_d[None, :], mask=q_valid[:, None], other=0.0)
    selected_rows = SELECTED + (bh * nq + q_blocks)[:, None] * nk
    # a finite start, as in tail_lse_kernel: a chunk with every block selected leaves exp2(-inf - m) = 0
    m_i = tl.full((GROUP,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((GROUP,), dtype=tl.float32)
    for start in range(0, nk, CHUNK):
        blocks = start + tl.arange(0, CHUNK)
        exists = blocks < nk
        k_bar = tl.load(K_MEAN + (bh * nk + blocks)[:, None] * D + offs_d[None, :], mask=exists[:, None], other=0.0)
        rest = tl.load(selected_rows + blocks[None, :], mask=q_valid[:, None] & exists[None, :], other=1) == 0
        log2_count = tl.log2(tl.maximum(tl.minimum(N - blocks * block_k, block_k), 1).to(tl.float32))
        s = tl.dot(q_bar, tl.trans(k_bar), input_precision="ieee") * qk_scale + log2_count[None, :]
        s = tl.where(rest, s, float("-inf"))
        m_i, l_i = lse_step(s, m_i, l_i)
    lse = lse_total(m_i, l_i)
    rows = q_blocks[:, None] * BLOCK_Q + tl.arange(0, BLOCK_Q)[None, :]
    row_valid = q_valid[:, None] & (rows < N)
    row_logits = tl.load(ROW_LOGITS + bh * N + rows, mask=row_valid, other=0.0)
    tl.store(LSE_TAIL + bh * N + rows, lse[:, None] - row_logits * 1.4426950408889634, mask=row_valid)


# --------------------------------------------------------------------------------------------------
# the linear and sparse launches
# --------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "H", "n_sel", "nq", "nk"])
def fwd_lin_kernel(
    V, NEG_PHI_K, Z_BLOCK, LUT, H_ALL, Z_ALL, H_REST, Z_REST,
    stride_vb, stride_vh, stride_vn, N, H, n_sel, nq, nk,
    D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The linear branch's state of one query (routing) block: H_rest = H_all - H_sel (D x D, in the
    input dtype) and z_rest = z_all - z_sel.  The sparse launch's epilogue turns it into
    O_l = phi(Q) H_rest / (phi(Q) z_rest + eps), so this launch never reads Q or writes an N x D tensor."""
    qb, bh, b, h = common.program_coords(H, D, BLOCK_N, BLOCK_N)
    V += b * stride_vb + h * stride_vh
    state = bh * nq + qb
    lut_row = LUT + state * n_sel
    # the buffer holds -phi(K) (k_feats NEGATE_PHI): starting from H_all the loop ends on H_all - H_sel
    h_all = common.load_square(H_ALL + bh * D * D, D)
    h_rest, z_sel = common.sum_selected_blocks(h_all, NEG_PHI_K + bh * N * D, V, Z_BLOCK + bh * nk * D, lut_row,
                                         n_sel, N, stride_vn, D, BLOCK_N)
    offs_d = tl.arange(0, D)
    common.store_square(H_REST + state * D * D, h_rest.to(H_REST.dtype.element_ty), D)
    tl.store(Z_REST + state * D + offs_d, tl.load(Z_ALL + bh * D + offs_d) - z_sel)


@triton.jit(do_not_specialize=["N", "H", "n_sel", "nq", "nk", "block_q", "qk_scale", "inv_n", "has_lin"])
def fwd_sparse_kernel(
    Q, K, V, Q_INT8, Q_SCALE, K_INT8, K_SCALE, V_FP8, V_ABSMAX, K_SUM, LUT, ALPHA, H_REST, Z_REST,
    O, LSE, INV_DEN, PHI_Q, LSE_TAIL, ALPHA_ROWS,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    N, H, n_sel, nq, nk, block_q, qk_scale, inv_n, npad, has_lin,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr,
    FP8_EMULATE: tl.constexpr, SAVE_LSE: tl.constexpr, HEDGEHOG: tl.constexpr = False,
    MIX_ROWS: tl.constexpr = False, LIN_PER_HEAD: tl.constexpr = False,
):
    """One query tile: the sparse branch over its LUT row (online softmax in exp2; QK^T in INT8 and PV in
    FP8 for the low-bit modes), then the epilogue that finishes the linear branch from the routing
    block's state and mixes: O = alpha O_s + (1 - alpha) phi(Q) H_rest / den, in one MMA.  Writes 1/den
    per row (for the backward) and, if SAVE_LSE, the log2-sum-exp of the 16-bit logits.

    phi(Q) is softmax over the head dim of the Q tile, or with HEDGEHOG read from PHI_Q (q_prepass).
    alpha is ALPHA[h] (sigmoid of the head's logit, from the host), or with MIX_ROWS one per row from the
    loop's own log-sum-exp, LSE_TAIL and the head's logit ALPHA[h] (:func:`row_mix_ratio`), stored in
    ALPHA_ROWS when SAVE_LSE.  H_REST / Z_REST hold one state per routing block or, with LIN_PER_HEAD (the
    linear branch over every key block), one per (batch, head): H_all and z_all."""
    tile, bh, b, h = common.program_coords(H, D, BLOCK_M, BLOCK_N)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    qb = (tile * BLOCK_M) // block_q
    state = bh * nq + qb
    offs_d = tl.arange(0, D)
    rows, row_valid = common.block_rows(tile, BLOCK_M, N)

    if QUANT == 0:
        q = common.load_rows(Q, rows, stride_qn, row_valid, D)
    else:
        q = common.load_rows(Q_INT8 + bh * N * D, rows, D, row_valid, D)
        q_scale = tl.load(Q_SCALE + bh * nq + qb)
        K_INT8 += bh * N * D
        K_SCALE += bh * nk
    if QUANT == 2:
        V_FP8 += bh * D * npad
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    lut_row = LUT + state * n_sel
    for step in range(0, n_sel):
        cols, col_valid, block = common.selected_key_rows(lut_row, step, N, BLOCK_N)
        # S = Q K^T (log2 units; INT8 with per-block scales in the low-bit modes)
        if QUANT == 0:
            k = common.load_rows(K, cols, stride_kn, col_valid, D)
            s = tl.dot(q, tl.trans(k)) * qk_scale
        else:
            k_int8 = common.load_rows(K_INT8, cols, D, col_valid, D)
            s_scale = tl.load(K_SCALE + block) * q_scale
            s = tl.dot(q, tl.trans(k_int8), out_dtype=tl.int32).to(tl.float32) * s_scale
        s = tl.where(col_valid[None, :], s, float("-inf"))
        # P = exp2(S - running max); rescale the running sum and accumulator
        p, m_i, l_i, acc = softmax_step(s, m_i, l_i, acc)
        # acc += P V (FP8: P scaled by 448, V by its per-channel scale; zero-padded V needs no mask)
        if QUANT == 2:
            v_fp8 = tl.load(V_FP8 + offs_d[None, :] * npad + cols[:, None])
            acc = tl.dot(_to_fp8(p * FP8_MAX, FP8_EMULATE), v_fp8, acc)
        else:
            v = common.load_rows(V, cols, stride_vn, col_valid, D)
            acc = tl.dot(p.to(v.dtype), v, acc)

    o_s = acc / l_i[:, None]
    if QUANT == 2:
        v_scale = tl.maximum(tl.load(V_ABSMAX + bh * D + offs_d), 1e-8) / FP8_MAX
        o_s = o_s * (v_scale / FP8_MAX)[None, :]
    # the log2-sum-exp of the loop's logits: LSE_sel of per-query mixing, in the frame of the loop's logits
    # (K - mean(K) in the low-bit modes), the frame the tail launch gives LSE_tail in
    lse = m_i + tl.log2(l_i)
    if MIX_ROWS:
        alpha = row_mix_ratio(lse, LSE_TAIL, tl.load(ALPHA + h), bh * N + rows, row_valid, has_lin, MIX_ROWS)
        if SAVE_LSE:
            tl.store(ALPHA_ROWS + bh * N + rows, alpha, mask=row_valid)
    else:
        alpha = tl.load(ALPHA + h)
    if QUANT == 0:
        q16 = q
    elif SAVE_LSE or not HEDGEHOG:  # Hedgehog inference needs no 16-bit Q here: fewer registers
        q16 = common.load_rows(Q, rows, stride_qn, row_valid, D)
    if SAVE_LSE:
        if QUANT > 0:
            # the INT8 logits used K - mean(K); the 16-bit backward needs the LSE of the unshifted logits
            k_mean = tl.load(K_SUM + bh * D + offs_d) * inv_n
            lse += tl.sum(q16.to(tl.float32) * k_mean[None, :], axis=1) * qk_scale
        tl.store(LSE + bh * N + rows, lse, mask=row_valid)
    if HEDGEHOG:
        phi_q = common.load_rows(PHI_Q + bh * N * D, rows, D, row_valid, D).to(tl.float32)
    else:
        phi_q = common.phi(q16.to(tl.float32))
    if LIN_PER_HEAD:
        lin_state = bh
    else:
        lin_state = state
    mix_and_store(o_s, phi_q, alpha, H_REST, Z_REST, O, INV_DEN, bh, lin_state, rows, row_valid, stride_on, N, has_lin,
                  D, MIX_ROWS)
