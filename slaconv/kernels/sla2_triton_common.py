"""Triton device functions shared by the SLA2 forward and backward kernels, and their conventions.

The kernels are in ``sla2_triton_forward.py`` and ``sla2_triton_backward.py``; ``sla2_triton.py``
allocates their buffers and launches them (the design: README.md beside it).  Conventions shared by every
kernel:

* The second grid axis is ``bh = b * H + h``.  User tensors (Q, K, V, O, dO, dQ, dK, dV) are read and
  written through their (batch, head, token) strides with a unit head-dim stride; each program offsets
  their base pointers to its (batch, head) once.  Internal buffers are (B*H, rows, D) or (B*H, rows)
  and contiguous.
* Only D, the tile sizes, the low-bit mode and the dtype-dependent choices are constexpr.  N, block
  counts, the number of selected blocks and the scales are runtime arguments listed in
  ``do_not_specialize`` so that a new resolution or top-k never recompiles.  Strides are deliberately
  *not* listed: Triton's divisible-by-16 specialisation is what lets it prove row alignment and load
  tiles with 16-byte cp.async instead of 2-byte scalar loads, and with D = 64/128 and a unit head-dim
  stride every stride of both layouts is a multiple of 16 for any N, so the specialisation key never
  changes (tests/test_kernel_codegen.py checks the loads).
* The linear branch is "all minus selected" in D x D form: H_all = sum_j phi(K_j)^T V_j and
  z_all = sum_j phi(K_j) over every key block, minus the same sums over the blocks a query block
  selected, gives the rest: H_rest = H_all - H_sel and z_rest = z_all - z_sel.  Then
  O_l = phi(Q) H_rest / (phi(Q) z_rest + eps).  The backward uses the same form for dK/dV.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def check_head_dim(D: tl.constexpr):
    """The head dims the kernels are written for (config.KERNEL_HEAD_DIMS)."""
    tl.static_assert(D == 64 or D == 128, "head dim D must be 64 or 128")


@triton.jit
def check_rows(BLOCK: tl.constexpr):
    """Query tiles and key blocks: whole MMA tiles of 64 or 128 rows (config.BLOCK_SIZES)."""
    tl.static_assert(BLOCK == 64 or BLOCK == 128, "tiles and blocks are 64 or 128 rows")


@triton.jit
def program_coords(H, D: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """This program's index on the first grid axis and its bh = b * H + h (the second axis, as int64), b and
    h; checks at compile time that D and the program's two tile sizes are ones the kernels are written for."""
    check_head_dim(D)
    check_rows(ROWS)
    check_rows(COLS)
    bh = tl.program_id(1).to(tl.int64)
    return tl.program_id(0), bh, bh // H, bh % H


@triton.jit
def block_rows(index, BLOCK: tl.constexpr, N):
    """The token rows of tile or block ``index`` (``BLOCK`` rows each) and which of them are < N."""
    rows = index * BLOCK + tl.arange(0, BLOCK)
    return rows, rows < N


@triton.jit
def load_rows(ptr, rows, row_stride, valid, D: tl.constexpr):
    """A (len(rows), D) tile of a row-major tensor with unit column stride; invalid rows read as 0."""
    return tl.load(ptr + rows[:, None] * row_stride + tl.arange(0, D)[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def store_rows(ptr, rows, row_stride, valid, x, D: tl.constexpr):
    """Store a (len(rows), D) tile (cast to the buffer's dtype); invalid rows are skipped."""
    ptrs = ptr + rows[:, None] * row_stride + tl.arange(0, D)[None, :]
    tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit
def add_rows(ptr, rows, row_stride, valid, x, D: tl.constexpr):
    """Add the fp32 tile ``x`` to the rows a previous launch stored (a gradient's other part), in fp32."""
    store_rows(ptr, rows, row_stride, valid, x + load_rows(ptr, rows, row_stride, valid, D).to(tl.float32), D)


@triton.jit
def load_square(ptr, D: tl.constexpr):
    """A contiguous D x D matrix."""
    offs_d = tl.arange(0, D)
    return tl.load(ptr + offs_d[:, None] * D + offs_d[None, :])


@triton.jit
def store_square(ptr, x, D: tl.constexpr):
    offs_d = tl.arange(0, D)
    tl.store(ptr + offs_d[:, None] * D + offs_d[None, :], x)


@triton.jit
def phi(x):
    """The linear branch's feature map: softmax over the last (head) dim, fp32 in and out."""
    row_max = tl.max(x, axis=1)
    e = tl.exp(x - row_max[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def hedgehog(x, W_SIGNED, D: tl.constexpr):
    """The Hedgehog feature map of a tile ``x`` (rows, D) in its own dtype, fp32 out:
    [softmax(x W), softmax(-x W)] from this head's signed stack W_SIGNED = [W, -W] (D x D, contiguous,
    x's dtype).  One MMA gives both halves' logits; each half is normalised on its own."""
    logits = tl.dot(x, load_square(W_SIGNED, D))
    upper = (tl.arange(0, D) >= D // 2)[None, :]
    max_lo = tl.max(tl.where(upper, float("-inf"), logits), axis=1)
    max_hi = tl.max(tl.where(upper, logits, float("-inf")), axis=1)
    e = tl.exp(logits - tl.where(upper, max_hi[:, None], max_lo[:, None]))
    sum_lo = tl.sum(tl.where(upper, 0.0, e), axis=1)
    sum_hi = tl.sum(tl.where(upper, e, 0.0), axis=1)
    return e / tl.where(upper, sum_hi[:, None], sum_lo[:, None])


@triton.jit
def features(x, W_SIGNED, HEDGEHOG: tl.constexpr, D: tl.constexpr):
    """The linear branch's features of a tile ``x`` (rows, D), fp32: :func:`hedgehog` with this head's
    signed weights if HEDGEHOG, else :func:`phi` (softmax over the head dim; W_SIGNED is not read)."""
    if HEDGEHOG:
        feats = hedgehog(x, W_SIGNED, D)
    else:
        feats = phi(x.to(tl.float32))
    return feats


@triton.jit
def features_backward(feats, dfeats, HEDGEHOG: tl.constexpr, D: tl.constexpr):
    """Through the features' softmax Jacobian (fp32 tiles): the gradient of the softmax logits from the
    features and their gradient.  Softmax: the logits are the input rows, so this is their gradient.
    HEDGEHOG: each half is its own softmax, and the result is the gradient of the stacked logits
    [x W, -x W], from which the caller forms dx and dW with the signed weights."""
    if HEDGEHOG:
        upper = (tl.arange(0, D) >= D // 2)[None, :]
        prod = feats * dfeats
        dot_lo = tl.sum(tl.where(upper, 0.0, prod), axis=1)
        dot_hi = tl.sum(tl.where(upper, prod, 0.0), axis=1)
        dlogits = feats * (dfeats - tl.where(upper, dot_hi[:, None], dot_lo[:, None]))
    else:
        dlogits = feats * (dfeats - tl.sum(feats * dfeats, axis=1)[:, None])
    return dlogits


@triton.jit
def load_alpha(ALPHA, h, per_row, valid, MIX_ROWS: tl.constexpr):
    """The mixing ratio: this head's scalar ``ALPHA[h]``, or with MIX_ROWS one per row, ``ALPHA[per_row]``
    (rows past N read 1, so they add nothing to a (1 - alpha) term)."""
    if MIX_ROWS:
        alpha = tl.load(ALPHA + per_row, mask=valid, other=1.0)
    else:
        alpha = tl.load(ALPHA + h)
    return alpha


@triton.jit
def selected_key_rows(lut_row, step, N, BLOCK_N: tl.constexpr):
    """Token rows of the key block at position ``step`` of a LUT row, which of them exist, and the block id."""
    block = tl.load(lut_row + step)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.max_contiguous(tl.multiple_of(rows, BLOCK_N), BLOCK_N)
    return rows, rows < N, block


@triton.jit
def sum_selected_blocks(acc_h, PHI_K, V, Z_BLOCK, lut_row, n_sel, N, stride_vn,
                         D: tl.constexpr, BLOCK_N: tl.constexpr):
    """``acc_h`` plus sum of PHI_K_j^T V_j over the key blocks j of a LUT row (D x D fp32), and z_sel, the
    sum of those blocks' phi(K) column sums (read from Z_BLOCK: the loaded tile feeds the MMA only).
    The forward passes -phi(K) and starts from H_all, so it ends on H_rest directly; the backward
    passes phi(K) and zeros.  PHI_K, V and Z_BLOCK point at this (batch, head)."""
    offs_d = tl.arange(0, D)
    z_sel = tl.zeros((D,), dtype=tl.float32)
    for step in range(0, n_sel):
        rows, valid, block = selected_key_rows(lut_row, step, N, BLOCK_N)
        phi_k = load_rows(PHI_K, rows, D, valid, D)
        v = load_rows(V, rows, stride_vn, valid, D)
        # H += phi(K_j)^T V_j, z += z_j
        acc_h = tl.dot(tl.trans(phi_k), v, acc_h)
        z_sel += tl.load(Z_BLOCK + block * D + offs_d)
    return acc_h, z_sel


@triton.jit
def split_outer_product(A, B, stride_bn, n_blocks, n_splits, N, D: tl.constexpr, BLOCK: tl.constexpr):
    """This program's share of sum over rows of A^T B (D x D fp32): the contiguous run of row blocks of
    split ``program_id(0)`` out of ``n_splits``.  A is contiguous (rows, D), B has row stride ``stride_bn``.
    A bare load-and-MMA loop, so the loads pipeline."""
    split = tl.program_id(0)
    blocks_per_split = tl.cdiv(n_blocks, n_splits)
    acc = tl.zeros((D, D), dtype=tl.float32)
    for block in range(split * blocks_per_split, tl.minimum(n_blocks, split * blocks_per_split + blocks_per_split)):
        rows = block * BLOCK + tl.arange(0, BLOCK)
        valid = rows < N
        a = load_rows(A, rows, D, valid, D)
        b = load_rows(B, rows, stride_bn, valid, D)
        acc = tl.dot(tl.trans(a), b, acc)
    return acc
