"""Triton kernels of the SLA2 backward: 16-bit math on the original Q, K, V (straight-through for the
low-bit forwards), from O, the LSE and 1/den saved by the forward.

Conventions and shared device functions: ``sla2_triton_common.py``; launched by ``sla2_triton.backward``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import sla2_triton_common as common


@triton.jit(do_not_specialize=["N", "H"])
def phi_rows(
    X, PHI, W_SIGNED, stride_xb, stride_xh, stride_xn, N, H,
    D: tl.constexpr, BLOCK: tl.constexpr, HEDGEHOG: tl.constexpr = False,
):
    """phi(X) of one tile of rows (softmax over the head dim, or with HEDGEHOG the Hedgehog map of this
    head's signed weights W_SIGNED (H, D, D)), stored (B*H, N, D) in X's dtype."""
    tile, bh, b, h = common.program_coords(H, D, BLOCK, BLOCK)
    rows, valid = common.block_rows(tile, BLOCK, N)
    x = common.load_rows(X + b * stride_xb + h * stride_xh, rows, stride_xn, valid, D)
    feats = common.features(x, W_SIGNED + h * D * D, HEDGEHOG, D)
    common.store_rows(PHI + bh * N * D, rows, D, valid, feats.to(x.dtype), D)


@triton.jit
def logits_to_input_grad(dlogits, W_SIGNED, DLOGITS, rows, valid, dtype: tl.constexpr, D: tl.constexpr):
    """Hedgehog: store the gradient of a tile's stacked logits [X W, -X W] (rows of the contiguous DLOGITS, in
    ``dtype``, for the weights' gradient) and return the tile's dX = dlogits [W, -W]^T (fp32) from this head's
    signed stack W_SIGNED."""
    dlogits16 = dlogits.to(dtype)
    common.store_rows(DLOGITS, rows, D, valid, dlogits16, D)
    return tl.dot(dlogits16, tl.trans(common.load_square(W_SIGNED, D)))


@triton.jit(do_not_specialize=["N", "H"])
def phi_to_psi(
    PHI, INV_DEN, ALPHA, N, H,
    D: tl.constexpr, BLOCK: tl.constexpr, MIX_ROWS: tl.constexpr = False,
):
    """In place: phi(Q) -> psi = (1 - alpha) phi(Q) / den, the row scaling of the linear branch's gradient
    g = (1 - alpha) dO / den moved onto phi(Q), so the backward's D x D reductions (A = sum psi^T dO) are
    plain load + MMA loops on two 16-bit tiles.  alpha: per head, or with MIX_ROWS per row."""
    tile, bh, b, h = common.program_coords(H, D, BLOCK, BLOCK)
    PHI += bh * N * D
    rows, valid = common.block_rows(tile, BLOCK, N)
    phi = common.load_rows(PHI, rows, D, valid, D)
    alpha = common.load_alpha(ALPHA, h, bh * N + rows, valid, MIX_ROWS)
    scale = (1.0 - alpha) * tl.load(INV_DEN + bh * N + rows, mask=valid, other=0.0)
    common.store_rows(PHI, rows, D, valid, (phi.to(tl.float32) * scale[:, None]).to(phi.dtype), D)


@triton.jit(do_not_specialize=["N", "H", "n_tiles"])
def bwd_rows(
    PHI_Q, DO, O, W, INV_DEN, ALPHA, DELTA, B_PARTIAL, DALPHA_PARTIAL, DLOGIT_ROWS,
    stride_dob, stride_doh, stride_don, stride_ob, stride_oh, stride_on, N, H, n_tiles,
    D: tl.constexpr, BLOCK_M: tl.constexpr, MIX_ROWS: tl.constexpr = False, ROW_GRADS: tl.constexpr = False,
):
    """Per row of one query tile (one program each, no loop), from the output O (not O_s: O is kept by the
    next layer anyway) and w = rowsum(dO * O_l) from the dQ-linear launch, with u = (1 - alpha) w and
    c = -u / den: delta = alpha rowsum(dO * O_s) = rowsum(dO * O) - u.  Per-tile partials (summed by the
    caller, deterministic): b = sum c phi(q) and the alpha-logit gradient
    alpha (1 - alpha) sum dO (O_s - O_l) = sum (1 - alpha) rowsum(dO * O) - u, which with MIX_ROWS (alpha
    per row; its two log-sum-exps carry no gradient) is the same sum with each row's alpha.  ROW_GRADS
    (``mixing: query-linear``) also stores each row's term, the gradient of the row's alpha logit, in
    DLOGIT_ROWS."""
    tile, bh, b, h = common.program_coords(H, D, BLOCK_M, BLOCK_M)
    offs_d = tl.arange(0, D)
    rows, valid = common.block_rows(tile, BLOCK_M, N)
    per_row = bh * N + rows
    alpha = common.load_alpha(ALPHA, h, per_row, valid, MIX_ROWS)
    do = common.load_rows(DO + b * stride_dob + h * stride_doh, rows, stride_don, valid, D).to(tl.float32)
    o = common.load_rows(O + b * stride_ob + h * stride_oh, rows, stride_on, valid, D).to(tl.float32)
    do_dot_o = tl.sum(do * o, axis=1)
    u = (1.0 - alpha) * tl.load(W + per_row, mask=valid, other=0.0)
    c = -u * tl.load(INV_DEN + per_row, mask=valid, other=0.0)
    tl.store(DELTA + per_row, do_dot_o - u, mask=valid)
    dlogit = (1.0 - alpha) * do_dot_o - u  # rows past N read 0 for dO, O and w: 0 here
    tl.store(DALPHA_PARTIAL + bh * n_tiles + tile, tl.sum(dlogit, axis=0))
    phi_q = common.load_rows(PHI_Q + bh * N * D, rows, D, valid, D).to(tl.float32)
    tl.store(B_PARTIAL + (bh * n_tiles + tile) * D + offs_d, tl.sum(c[:, None] * phi_q, axis=0))
    if ROW_GRADS:
        tl.store(DLOGIT_ROWS + per_row, dlogit, mask=valid)


@triton.jit(do_not_specialize=["N", "H", "n_tiles", "n_splits"])
def bwd_outer(
    PSI, DO, A_PARTIAL,
    stride_dob, stride_doh, stride_don, N, H, n_tiles, n_splits,
    D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Partial A_all = sum phi(Q)^T g = sum psi^T dO (g = (1 - alpha) dO / den) over one contiguous run of
    query tiles (a split-K GEMM; the caller sums the n_splits partials)."""
    split, bh, b, h = common.program_coords(H, D, BLOCK_M, BLOCK_M)
    DO += b * stride_dob + h * stride_doh
    acc = common.split_outer_product(PSI + bh * N * D, DO, stride_don, n_tiles, n_splits, N, D, BLOCK_M)
    common.store_square(A_PARTIAL + (bh * n_splits + split) * D * D, acc, D)


@triton.jit(do_not_specialize=["N", "H", "n_sel", "nq", "nk", "block_q"])
def bwd_dq_lin_kernel(
    V, DO, DQ, Z_BLOCK, LUT, W, INV_DEN, H_ALL, Z_ALL, ALPHA, PHI_Q, PHI_K, W_SIGNED, DLOGITS,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
    N, H, n_sel, nq, nk, block_q,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEDGEHOG: tl.constexpr = False,
    MIX_ROWS: tl.constexpr = False,
):
    """Linear part of dQ (writes DQ): dphi(q) = g H_rest^T + c z_rest, through phi's softmax Jacobian;
    g = (1 - alpha) dO / den.  O_l is not saved by the forward: its numerator phi(Q) H_rest is recomputed
    here (one MMA) to give w = rowsum(dO * O_l), written for the later launches (u = (1 - alpha) w,
    c = -u / den).  With HEDGEHOG the Jacobian gives the gradient of the stacked logits [Q W, -Q W]
    (:func:`common.features_backward`): DQ receives it times [W, -W]^T (this head's W_SIGNED), and DLOGITS
    ((B*H, N, D), the input dtype) the gradient itself, for the host's dW.  MIX_ROWS: alpha per row."""
    tile, bh, b, h = common.program_coords(H, D, BLOCK_M, BLOCK_N)
    V += b * stride_vb + h * stride_vh
    offs_d = tl.arange(0, D)
    rows, valid = common.block_rows(tile, BLOCK_M, N)
    per_row = bh * N + rows
    lut_row = LUT + (bh * nq + (tile * BLOCK_M) // block_q) * n_sel
    h_sel, z_sel = common.sum_selected_blocks(tl.zeros((D, D), dtype=tl.float32), PHI_K + bh * N * D, V,
                                        Z_BLOCK + bh * nk * D, lut_row, n_sel, N, stride_vn, D, BLOCK_N)
    h_rest = (common.load_square(H_ALL + bh * D * D, D) - h_sel).to(DO.dtype.element_ty)
    z_rest = tl.load(Z_ALL + bh * D + offs_d) - z_sel
    alpha = common.load_alpha(ALPHA, h, per_row, valid, MIX_ROWS)
    inv_den = tl.load(INV_DEN + per_row, mask=valid, other=0.0)
    do = common.load_rows(DO + b * stride_dob + h * stride_doh, rows, stride_don, valid, D)
    phi_q = common.load_rows(PHI_Q + bh * N * D, rows, D, valid, D)
    # w = rowsum(dO * O_l), from the forward's numerator phi(Q) H_rest (same operands)
    numerator = tl.dot(phi_q, h_rest)
    w = inv_den * tl.sum(do.to(tl.float32) * numerator, axis=1)
    c = -(1.0 - alpha) * inv_den * w
    tl.store(W + per_row, w, mask=valid)
    # dphi(Q) = g H_rest^T + c z_rest, then through phi's Jacobian
    g = (do.to(tl.float32) * ((1.0 - alpha) * inv_den)[:, None]).to(do.dtype)
    dphi = tl.dot(g, tl.trans(h_rest)) + c[:, None] * z_rest[None, :]
    dq = common.features_backward(phi_q.to(tl.float32), dphi, HEDGEHOG, D)
    if HEDGEHOG:
        dq = logits_to_input_grad(dq, W_SIGNED + h * D * D, DLOGITS + bh * N * D, rows, valid, do.dtype, D)
    common.store_rows(DQ + b * stride_dqb + h * stride_dqh, rows, stride_dqn, valid, dq, D)


@triton.jit(do_not_specialize=["N", "H", "n_sel", "nq", "nk", "block_q", "qk_scale", "sm_scale"])
def bwd_dq_kernel(
    Q, K, V, DO, DQ, LUT, LSE, DELTA, ALPHA,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
    N, H, n_sel, nq, nk, block_q, qk_scale, sm_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MIX_ROWS: tl.constexpr = False,
):
    """Sparse part of dQ over the LUT row, added to the linear part already in DQ.  MIX_ROWS: alpha per row."""
    tile, bh, b, h = common.program_coords(H, D, BLOCK_M, BLOCK_N)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DQ += b * stride_dqb + h * stride_dqh
    rows, row_valid = common.block_rows(tile, BLOCK_M, N)
    per_row = bh * N + rows
    do = common.load_rows(DO + b * stride_dob + h * stride_doh, rows, stride_don, row_valid, D)
    q = common.load_rows(Q + b * stride_qb + h * stride_qh, rows, stride_qn, row_valid, D)
    lse = tl.load(LSE + per_row, mask=row_valid, other=0.0)
    delta = tl.load(DELTA + per_row, mask=row_valid, other=0.0)
    # the sparse branch's share of dO
    if MIX_ROWS:
        do_s = (do.to(tl.float32) * common.load_alpha(ALPHA, h, per_row, row_valid, MIX_ROWS)[:, None]).to(do.dtype)
    else:
        do_s = (do.to(tl.float32) * tl.load(ALPHA + h)).to(do.dtype)
    dq = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    lut_row = LUT + (bh * nq + (tile * BLOCK_M) // block_q) * n_sel
    for step in range(0, n_sel):
        cols, col_valid, _ = common.selected_key_rows(lut_row, step, N, BLOCK_N)
        k = common.load_rows(K, cols, stride_kn, col_valid, D)
        v = common.load_rows(V, cols, stride_vn, col_valid, D)
        # P from the saved LSE; dS = P (dP - delta); dQ += dS K
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where(col_valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do_s, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    common.add_rows(DQ, rows, stride_dqn, row_valid, dq * sm_scale, D)


@triton.jit(do_not_specialize=["N", "H", "nk"])
def bwd_dkdv_lin_kernel(
    V, DO, DK, DV, TILE_OFFSETS, TILE_IDS, W, A_ALL, B_ALL, PSI, PHI_K,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, N, H, nk, W_SIGNED, DLOGITS,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEDGEHOG: tl.constexpr = False,
):
    """Linear part of dK, dV for one key block (writes DK, DV): over the query tiles that selected it,
    A_sel = sum phi(Q)^T g = sum psi^T dO and b_sel = sum c phi(Q) = -sum w psi (both on the tensor
    cores: the loop only loads two 16-bit tiles and a row vector); with A_rest = A_all - A_sel and
    b_rest = b_all - b_sel: dV = phi(K) A_rest, dphi(K) = V A_rest^T + b_rest, through phi's Jacobian.  With
    HEDGEHOG as in :func:`bwd_dq_lin_kernel`: dK through [W, -W], and DLOGITS the stacked logits' gradient."""
    kb, bh, b, h = common.program_coords(H, D, BLOCK_M, BLOCK_N)
    DO += b * stride_dob + h * stride_doh
    offs_d = tl.arange(0, D)
    key_rows, key_valid = common.block_rows(kb, BLOCK_N, N)
    tile_rows = tl.arange(0, BLOCK_M)
    w_column = tl.arange(0, 16)  # the smallest MMA width: column 0 carries -w, the rest are zero
    a_sel = tl.zeros((D, D), dtype=tl.float32)
    b_sel = tl.zeros((D, 16), dtype=tl.float32)
    first = tl.load(TILE_OFFSETS + bh * nk + kb)
    last = tl.load(TILE_OFFSETS + bh * nk + kb + 1)
    for entry in range(first, last):
        rows = tl.load(TILE_IDS + entry) * BLOCK_M + tile_rows
        valid = rows < N
        # PSI and W share one row index: a separate base pointer for each costs registers (one program
        # fewer per SM at D = 64)
        per_row = bh * N + rows
        do = common.load_rows(DO, rows, stride_don, valid, D)
        psi = common.load_rows(PSI, per_row, D, valid, D)
        w = tl.load(W + per_row, mask=valid, other=0.0)
        # A_sel += psi^T dO; b_sel += psi^T (-w) as a 16-wide MMA
        a_sel = tl.dot(tl.trans(psi), do, a_sel)
        minus_w = tl.where(w_column[None, :] == 0, -w[:, None], 0.0).to(psi.dtype)
        b_sel = tl.dot(tl.trans(psi), minus_w, b_sel)
    a_rest = common.load_square(A_ALL + bh * D * D, D) - a_sel
    b_rest = tl.load(B_ALL + bh * D + offs_d) - tl.sum(b_sel, axis=1)
    phi_k = common.load_rows(PHI_K + bh * N * D, key_rows, D, key_valid, D)
    v = common.load_rows(V + b * stride_vb + h * stride_vh, key_rows, stride_vn, key_valid, D)
    a_rest16 = a_rest.to(v.dtype)  # 16-bit operands: dK, dV are 16-bit; fp32 operands spilled here
    dv = tl.dot(phi_k, a_rest16)
    common.store_rows(DV + b * stride_dvb + h * stride_dvh, key_rows, stride_dvn, key_valid, dv, D)
    dphi = tl.dot(v, tl.trans(a_rest16)) + b_rest[None, :]
    dk = common.features_backward(phi_k.to(tl.float32), dphi, HEDGEHOG, D)
    if HEDGEHOG:
        dk = logits_to_input_grad(dk, W_SIGNED + h * D * D, DLOGITS + bh * N * D, key_rows, key_valid, v.dtype, D)
    common.store_rows(DK + b * stride_dkb + h * stride_dkh, key_rows, stride_dkn, key_valid, dk, D)


@triton.jit(do_not_specialize=["N", "H", "nk", "qk_scale", "sm_scale"])
def bwd_dkdv_kernel(
    Q, K, V, DO, DKV, TILE_OFFSETS, TILE_IDS, LSE, DELTA, ALPHA,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dkvb, stride_dkvh, stride_dkvn,
    N, H, nk, qk_scale, sm_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GRAD_K: tl.constexpr,
    MIX_ROWS: tl.constexpr = False,
):
    """Sparse part of dK (GRAD_K) or dV for one key block over the query tiles that selected it (inverted
    index TILE_OFFSETS / TILE_IDS), added to the linear part already in DKV.  dK and dV are two launches
    with one fp32 accumulator each: both in one launch does not fit the register file.  MIX_ROWS: alpha per
    query row, applied inside the loop instead of once at the end."""
    kb, bh, b, h = common.program_coords(H, D, BLOCK_M, BLOCK_N)
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_dob + h * stride_doh
    DKV += b * stride_dkvb + h * stride_dkvh
    key_rows, key_valid = common.block_rows(kb, BLOCK_N, N)
    if not MIX_ROWS:
        alpha = tl.load(ALPHA + h)
    k = common.load_rows(K + b * stride_kb + h * stride_kh, key_rows, stride_kn, key_valid, D)
    if GRAD_K:
        v = common.load_rows(V + b * stride_vb + h * stride_vh, key_rows, stride_vn, key_valid, D)
    acc = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    first = tl.load(TILE_OFFSETS + bh * nk + kb)
    last = tl.load(TILE_OFFSETS + bh * nk + kb + 1)
    for entry in range(first, last):
        rows = tl.load(TILE_IDS + entry) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = rows < N
        q = common.load_rows(Q, rows, stride_qn, valid, D)
        do = common.load_rows(DO, rows, stride_don, valid, D)
        lse = tl.load(LSE + bh * N + rows, mask=valid, other=0.0)
        # P^T from the saved LSE (key rows x query columns, log2 units)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale
        p_t = tl.where(valid[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
        if MIX_ROWS:
            row_alpha = common.load_alpha(ALPHA, h, bh * N + rows, valid, MIX_ROWS)
        if GRAD_K:
            # dS^T = P^T (alpha dP^T - delta); dK += dS^T Q
            delta = tl.load(DELTA + bh * N + rows, mask=valid, other=0.0)
            dp_t = tl.dot(v, tl.trans(do))
            if MIX_ROWS:
                ds_t = p_t * (dp_t * row_alpha[None, :] - delta[None, :])
            else:
                ds_t = p_t * (dp_t * alpha - delta[None, :])
            acc = tl.dot(ds_t.to(q.dtype), q, acc)
        elif MIX_ROWS:
            # dV += P^T (alpha dO), alpha per query row
            acc = tl.dot(p_t.to(do.dtype), (do.to(tl.float32) * row_alpha[:, None]).to(do.dtype), acc)
        else:
            # dV += P^T dO (alpha applied once below)
            acc = tl.dot(p_t.to(do.dtype), do, acc)
    if GRAD_K:
        scale = sm_scale
    elif MIX_ROWS:
        scale = 1.0
    else:
        scale = alpha
    common.add_rows(DKV, key_rows, stride_dkvn, key_valid, acc * scale, D)
