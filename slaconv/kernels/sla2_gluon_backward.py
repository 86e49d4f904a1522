"""The sparse backward launches written in Gluon for Hopper (sm_90): dK and dV in one launch, and dQ.

**dK and dV** (:func:`bwd_dkdv_gluon_kernel`, ``LaunchConfig.dkdv_gluon``): the same result as the two
``bwd_dkdv_kernel`` launches (``GRAD_K`` 1 and 0) of the plain backward.  For each key block, over the query
tiles that selected it (the inverted index ``TILE_OFFSETS`` / ``TILE_IDS``): P^T from the saved
log2-sum-exp, dV += P^T (alpha dO), dP^T = V dO^T, dS^T = P^T (alpha dP^T - delta) and dK += dS^T Q, both
added to the linear parts already in DK and DV.  The plain launches run dK and dV apart because Triton holds
K and V as register operands, and with both fp32 accumulators that exceeds the register file; each launch
then recomputes S^T and P^T.  Here K and V stay in shared memory (loaded once per program by TMA) and every
MMA reads them from there, so one warpgroup holds both accumulators (2 x 64 registers), S^T and dP^T
(2 x 32) and the 16-bit P^T and dS^T operands, and S^T is computed once.  The query tiles' Q and dO stream
through a ring of ``STAGES`` shared slots: entry i + STAGES - 1 is loaded while entry i computes, into the
slot entry i - 1 released.

**dQ** (:func:`bwd_dq_gluon_kernel`, ``LaunchConfig.dq_gluon``): the same result as ``bwd_dq_kernel``, with
Q and dO in shared memory and the selected K and V blocks streaming through the ring the same way.

Both: one program per 64-row block and (batch * head), one warpgroup (4 warps, wgmma M = 64), two programs
per SM at ``STAGES`` = 2.  Q, K, V and dO are read through device-side 4-d descriptors (batch, head, token,
dim) with the tensors' strides, so both layouts work and a ragged last tile or block reads zeros past N
(masked out of the probabilities).  Gluon kernels do not run under ``TRITON_INTERPRET``: CPU tests compile
them for sm_90a (``tests/test_kernel_codegen.py``) and the GPU tests compare them with the plain launches.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from . import sla2_gluon as forward_gluon
from .sla2_gluon import GLUON_DTYPES, GLUON_HEAD_DIMS, GluonUnavailableError
from .sla2_gluon_partitions import _tma_load, tile4
from .sla2_triton_ws import scratch_allocator

GLUON_BWD_BLOCK = 64
"""Rows per program (key rows for dK / dV, query rows for dQ) and per inverted-index entry: one wgmma M of 64
per warpgroup; the backward's ``tile_m_bwd`` and ``block_k`` must both be 64."""
GLUON_BWD_STAGES = 2
"""Q / dO slots of the ring: at 2 a program's shared memory (K, V and two slots of Q and dO, 96 KiB at
D = 128) lets two programs share an SM."""


@gluon.jit
def _descriptors(Q, K, V, DO, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                 stride_vn, stride_dob, stride_doh, stride_don, B, H, N, D: gl.constexpr, BLOCK: gl.constexpr,
                 LAYOUT: gl.constexpr):
    """Device-side 4-d descriptors (batch, head, token, dim) of Q, K, V and dO with the tensors' strides, one
    (1, 1, BLOCK, D) box each."""
    q_desc = tma.make_tensor_descriptor(Q, [B, H, N, D], [stride_qb, stride_qh, stride_qn, 1], [1, 1, BLOCK, D], LAYOUT)
    k_desc = tma.make_tensor_descriptor(K, [B, H, N, D], [stride_kb, stride_kh, stride_kn, 1], [1, 1, BLOCK, D], LAYOUT)
    v_desc = tma.make_tensor_descriptor(V, [B, H, N, D], [stride_vb, stride_vh, stride_vn, 1], [1, 1, BLOCK, D], LAYOUT)
    do_desc = tma.make_tensor_descriptor(DO, [B, H, N, D], [stride_dob, stride_doh, stride_don, 1], [1, 1, BLOCK, D],
                                         LAYOUT)
    return q_desc, k_desc, v_desc, do_desc


@gluon.jit
def _buffers(dtype: gl.constexpr, BLOCK: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr, LAYOUT: gl.constexpr):
    """Shared memory of one program: two resident (BLOCK, D) tiles, two rings of STAGES such tiles, and
    STAGES + 1 mbarriers (one per ring slot, the last for the resident tiles), initialised."""
    first = gl.allocate_shared_memory(dtype, [BLOCK, D], LAYOUT)
    second = gl.allocate_shared_memory(dtype, [BLOCK, D], LAYOUT)
    first_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, D], LAYOUT)
    second_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, D], LAYOUT)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES + 1, 1], mbarrier.MBarrierLayout())
    for bar in gl.static_range(STAGES + 1):
        mbarrier.init(bars.index(bar), count=1)
    fence_async_shared()
    return first, second, first_ring, second_ring, bars


@gluon.jit
def _load_pair(desc_a, desc_b, dst_a, dst_b, bar, b, h, block, BLOCK: gl.constexpr, D: gl.constexpr):
    """TMA loads of 64-row block ``block`` of (batch b, head h) of two tensors into two shared tiles, counted on
    ``bar``."""
    mbarrier.expect(bar, desc_a.block_type.nbytes + desc_b.block_type.nbytes)
    _tma_load(desc_a, [b, h, block * BLOCK, 0], bar, tile4(dst_a, BLOCK, D))
    _tma_load(desc_b, [b, h, block * BLOCK, 0], bar, tile4(dst_b, BLOCK, D))


@gluon.jit
def _load_into_ring(desc_a, desc_b, ring_a, ring_b, bars, block_ids, i, b, h, BLOCK: gl.constexpr,
                    D: gl.constexpr, STAGES: gl.constexpr):
    """The i-th block of the list ``block_ids`` (query tiles from the inverted index, or the LUT row's key
    blocks) of two tensors into ring slot i % STAGES."""
    slot = i % STAGES
    _load_pair(desc_a, desc_b, ring_a.index(slot), ring_b.index(slot), bars.index(slot), b, h,
               gl.load(block_ids + i), BLOCK, D)


@gluon.jit
def _add_rows(ptr, row_stride, rows, acc, LAYOUT: gl.constexpr, D: gl.constexpr, N):
    """Add the fp32 accumulator (LAYOUT) to the rows < N a previous launch stored (the gradient's linear part)."""
    channels = gl.arange(0, D, layout=gl.SliceLayout(0, LAYOUT))
    offsets = gl.expand_dims(rows.to(gl.int64) * row_stride, 1) + gl.expand_dims(channels, 0)
    valid = gl.expand_dims(rows < N, 1) & gl.expand_dims(channels < D, 0)
    old = gl.load(ptr + offsets, mask=valid, other=0.0).to(gl.float32)
    gl.store(ptr + offsets, (old + acc).to(ptr.dtype.element_ty), mask=valid)


@gluon.jit(do_not_specialize=["N", "B", "H", "nk", "qk_scale", "sm_scale"])
def bwd_dkdv_gluon_kernel(
    Q, K, V, DO, DK, DV, TILE_OFFSETS, TILE_IDS, LSE, DELTA, ALPHA,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    N, B, H, nk, qk_scale, sm_scale,
    D: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr, MIX_ROWS: gl.constexpr,
    TILE_LAYOUT: gl.constexpr, TILE4_LAYOUT: gl.constexpr, S_LAYOUT: gl.constexpr, ACC_LAYOUT: gl.constexpr,
    A_LAYOUT: gl.constexpr,
):
    """Key block ``program_id(0)`` of (batch * head) ``program_id(1)``: the sparse parts of its dK and dV rows,
    added to DK and DV.  ALPHA holds the heads' mixing ratios, or with MIX_ROWS one per query row (B*H, N);
    LSE (log2 units) and DELTA are per query row (B*H, N)."""
    kb = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    dtype: gl.constexpr = Q.dtype.element_ty
    q_desc, k_desc, v_desc, do_desc = _descriptors(
        Q, K, V, DO, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_dob, stride_doh, stride_don, B, H, N, D, BLOCK, TILE4_LAYOUT)
    k_tile, v_tile, q_ring, do_ring, bars = _buffers(dtype, BLOCK, D, STAGES, TILE_LAYOUT)
    kv_bar = bars.index(STAGES)
    _load_pair(k_desc, v_desc, k_tile, v_tile, kv_bar, b, h, kb, BLOCK, D)

    first = gl.load(TILE_OFFSETS + bh * nk + kb)
    n_entries = gl.load(TILE_OFFSETS + bh * nk + kb + 1) - first
    for i in gl.static_range(STAGES - 1):
        if i < n_entries:
            _load_into_ring(q_desc, do_desc, q_ring, do_ring, bars, TILE_IDS + first, i, b, h, BLOCK, D, STAGES)
    if not MIX_ROWS:
        alpha = gl.load(ALPHA + h)
    s_zero = gl.zeros([BLOCK, BLOCK], gl.float32, S_LAYOUT)
    dk = gl.zeros([BLOCK, D], gl.float32, ACC_LAYOUT)
    dv = gl.zeros([BLOCK, D], gl.float32, ACC_LAYOUT)
    query_cols = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, S_LAYOUT))
    mbarrier.wait(kv_bar, 0)
    for i in range(n_entries):
        ahead = i + STAGES - 1
        if ahead < n_entries:  # its slot was released when entry i - 1's MMAs were waited for
            _load_into_ring(q_desc, do_desc, q_ring, do_ring, bars, TILE_IDS + first, ahead, b, h, BLOCK, D, STAGES)
        slot = i % STAGES
        q_slot = q_ring.index(slot)
        do_slot = do_ring.index(slot)
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
        s_t = warpgroup_mma(k_tile, q_slot.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dp_t = warpgroup_mma(v_tile, do_slot.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        cols = gl.load(TILE_IDS + first + i) * BLOCK + query_cols  # their latency hides behind the MMAs
        col_valid = cols < N
        lse = gl.load(LSE + bh * N + cols, mask=col_valid, other=0.0)
        delta = gl.load(DELTA + bh * N + cols, mask=col_valid, other=0.0)
        if MIX_ROWS:
            alpha_cols = gl.load(ALPHA + bh * N + cols, mask=col_valid, other=1.0)
        s_t = warpgroup_mma_wait(num_outstanding=1, deps=(s_t, ))
        # P^T (key rows x query columns) from the saved LSE; query columns past N (zeros through TMA) -> 0
        p_t = gl.where(gl.expand_dims(col_valid, 0),
                       gl.exp2(s_t * qk_scale - gl.expand_dims(lse, 0)), 0.0)
        if MIX_ROWS:
            pa_t = p_t * gl.expand_dims(alpha_cols, 0)
        else:
            pa_t = p_t  # alpha applied to dV once, at the end
        p_op = gl.convert_layout(pa_t.to(dtype), A_LAYOUT)
        dv = warpgroup_mma(p_op, do_slot, dv, is_async=True)
        dp_t = warpgroup_mma_wait(num_outstanding=1, deps=(dp_t, ))
        if MIX_ROWS:
            ds_t = p_t * (dp_t * gl.expand_dims(alpha_cols, 0) - gl.expand_dims(delta, 0))
        else:
            ds_t = p_t * (dp_t * alpha - gl.expand_dims(delta, 0))
        ds_op = gl.convert_layout(ds_t.to(dtype), A_LAYOUT)
        dk = warpgroup_mma(ds_op, q_slot, dk, is_async=True)
        dv, dk, p_op, ds_op = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk, p_op, ds_op))

    key_rows = kb * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, ACC_LAYOUT))
    _add_rows(DK + b.to(gl.int64) * stride_dkb + h * stride_dkh, stride_dkn, key_rows, dk * sm_scale, ACC_LAYOUT, D, N)
    if MIX_ROWS:
        dv_scale = 1.0
    else:
        dv_scale = alpha
    _add_rows(DV + b.to(gl.int64) * stride_dvb + h * stride_dvh, stride_dvn, key_rows, dv * dv_scale, ACC_LAYOUT, D, N)


@gluon.jit(do_not_specialize=["N", "B", "H", "n_sel", "nq", "block_q", "qk_scale", "sm_scale"])
def bwd_dq_gluon_kernel(
    Q, K, V, DO, DQ, LUT, LSE, DELTA, ALPHA,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
    N, B, H, n_sel, nq, block_q, qk_scale, sm_scale,
    D: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr, MIX_ROWS: gl.constexpr,
    TILE_LAYOUT: gl.constexpr, TILE4_LAYOUT: gl.constexpr, S_LAYOUT: gl.constexpr, ACC_LAYOUT: gl.constexpr,
    A_LAYOUT: gl.constexpr,
):
    """Query tile ``program_id(0)`` (``BLOCK`` rows) of (batch * head) ``program_id(1)``: the sparse part of its
    dQ rows over its routing block's LUT row, added to DQ: P from the saved LSE, dP = dO V^T,
    dS = P (alpha dP - delta), dQ += dS K.  Q and dO stay in shared memory; the selected K and V blocks
    stream through a ring of ``STAGES`` slots.  ALPHA as in :func:`bwd_dkdv_gluon_kernel`."""
    tile = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    dtype: gl.constexpr = Q.dtype.element_ty
    q_desc, k_desc, v_desc, do_desc = _descriptors(
        Q, K, V, DO, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_dob, stride_doh, stride_don, B, H, N, D, BLOCK, TILE4_LAYOUT)
    q_tile, do_tile, k_ring, v_ring, bars = _buffers(dtype, BLOCK, D, STAGES, TILE_LAYOUT)
    rows_bar = bars.index(STAGES)
    _load_pair(q_desc, do_desc, q_tile, do_tile, rows_bar, b, h, tile, BLOCK, D)

    lut_row = LUT + (bh.to(gl.int64) * nq + (tile * BLOCK) // block_q) * n_sel
    for i in gl.static_range(STAGES - 1):
        if i < n_sel:
            _load_into_ring(k_desc, v_desc, k_ring, v_ring, bars, lut_row, i, b, h, BLOCK, D, STAGES)
    rows = tile * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, S_LAYOUT))
    row_valid = rows < N
    lse = gl.expand_dims(gl.load(LSE + bh * N + rows, mask=row_valid, other=0.0), 1)
    delta = gl.expand_dims(gl.load(DELTA + bh * N + rows, mask=row_valid, other=0.0), 1)
    if MIX_ROWS:
        alpha = gl.expand_dims(gl.load(ALPHA + bh * N + rows, mask=row_valid, other=1.0), 1)
    else:
        alpha = gl.load(ALPHA + h)
    s_zero = gl.zeros([BLOCK, BLOCK], gl.float32, S_LAYOUT)
    dq = gl.zeros([BLOCK, D], gl.float32, ACC_LAYOUT)
    key_cols = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, S_LAYOUT))
    mbarrier.wait(rows_bar, 0)
    for i in range(n_sel):
        ahead = i + STAGES - 1
        if ahead < n_sel:  # its slot was released when block i - 1's MMAs were waited for
            _load_into_ring(k_desc, v_desc, k_ring, v_ring, bars, lut_row, ahead, b, h, BLOCK, D, STAGES)
        slot = i % STAGES
        k_slot = k_ring.index(slot)
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
        s = warpgroup_mma(q_tile, k_slot.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dp = warpgroup_mma(do_tile, v_ring.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        col_valid = gl.expand_dims(gl.load(lut_row + i) * BLOCK + key_cols < N, 0)  # keys past N: zeros by TMA
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
        p = gl.where(col_valid, gl.exp2(s * qk_scale - lse), 0.0)
        dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp, ))
        ds_op = gl.convert_layout((p * (dp * alpha - delta)).to(dtype), A_LAYOUT)
        dq = warpgroup_mma(ds_op, k_slot, dq, is_async=True)
        dq, ds_op = warpgroup_mma_wait(num_outstanding=0, deps=(dq, ds_op))

    _add_rows(DQ + b.to(gl.int64) * stride_dqb + h * stride_dqh, stride_dqn,
              tile * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, ACC_LAYOUT)), dq * sm_scale, ACC_LAYOUT, D, N)


def check_inputs(dtype: torch.dtype, head_dim: int, tile_m: int, block_k: int) -> None:
    """Raise :class:`GluonUnavailableError` (one line) unless the kernels compute this backward."""
    if dtype not in GLUON_DTYPES:
        raise GluonUnavailableError(f"the Gluon backward launches take dtypes {GLUON_DTYPES}, got {dtype}")
    if head_dim not in GLUON_HEAD_DIMS:
        raise GluonUnavailableError(f"the Gluon backward launches take head dims {GLUON_HEAD_DIMS}, got {head_dim}")
    if tile_m != GLUON_BWD_BLOCK or block_k != GLUON_BWD_BLOCK:
        raise GluonUnavailableError(f"the Gluon backward launches take {GLUON_BWD_BLOCK}-row query tiles and key "
                                    f"blocks, got {tile_m} and {block_k}")


def applies(device: torch.device, dtype: torch.dtype, head_dim: int, tile_m: int, block_k: int, tensors=()) -> bool:
    """Whether the kernels compute this backward on this device, reading and writing ``tensors`` through TMA
    (:func:`sla2_gluon.check_tma_operands`)."""
    try:
        check_inputs(dtype, head_dim, tile_m, block_k)
        forward_gluon.check_tma_operands(tensors)
        forward_gluon.check_device(device)
    except GluonUnavailableError:
        return False
    return True


def launch_dq_gluon(q, k, v, do, dq, lut, lse, delta, alpha, strides, N, B, H, n_sel, nq, block_q, qk_scale,
                    sm_scale, *, D: int, mix_rows: bool):
    """The sparse part of dQ, added to ``dq``, for (query tiles of 64 rows, B*H) in one launch.  ``strides`` are
    the (batch, head, token) strides of q, k, v, do and dq in that order; the other arguments are those of
    ``bwd_dq_kernel``.  The caller has checked :func:`applies`."""
    triton.set_allocator(scratch_allocator(q.device))
    bwd_dq_gluon_kernel[(triton.cdiv(N, GLUON_BWD_BLOCK), B * H)](
        q, k, v, do, dq, lut, lse, delta, alpha, *strides, N, B, H, n_sel, nq, block_q, qk_scale, sm_scale,
        D=D, BLOCK=GLUON_BWD_BLOCK, STAGES=GLUON_BWD_STAGES, MIX_ROWS=int(mix_rows), num_warps=4,
        **kernel_layouts(q.dtype, D),
    )


@functools.cache
def kernel_layouts(dtype: torch.dtype, head_dim: int) -> dict:
    """The layout constexprs: the NVMMA shared layout of a (64, D) tile and of its 4-d descriptor box, and the
    wgmma register layouts of S^T / dP^T (64 x 64), of the (64, D) accumulators and of P^T / dS^T as their A
    operand."""
    gl_dtype = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    shared = gl.NVMMASharedLayout.get_default_for
    block = GLUON_BWD_BLOCK

    def mma(n):
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])

    acc = mma(head_dim)
    return {"TILE_LAYOUT": shared([block, head_dim], gl_dtype),
            "TILE4_LAYOUT": shared([1, 1, block, head_dim], gl_dtype),
            "S_LAYOUT": mma(block), "ACC_LAYOUT": acc,
            "A_LAYOUT": gl.DotOperandLayout(operand_index=0, parent=acc, k_width=2)}


def launch_dkdv_gluon(q, k, v, do, dk, dv, tile_offsets, tile_ids, lse, delta, alpha, strides, N, B, H, nk,
                      qk_scale, sm_scale, *, D: int, mix_rows: bool):
    """The sparse parts of dK and dV, added to ``dk`` / ``dv``, for (nk key blocks, B*H) in one launch.
    ``strides`` are the (batch, head, token) strides of q, k, v, do, dk and dv in that order; the other
    arguments are those of ``bwd_dkdv_kernel``.  The caller has checked :func:`applies`."""
    triton.set_allocator(scratch_allocator(q.device))
    bwd_dkdv_gluon_kernel[(nk, B * H)](
        q, k, v, do, dk, dv, tile_offsets, tile_ids, lse, delta, alpha, *strides, N, B, H, nk, qk_scale,
        sm_scale, D=D, BLOCK=GLUON_BWD_BLOCK, STAGES=GLUON_BWD_STAGES, MIX_ROWS=int(mix_rows), num_warps=4,
        **kernel_layouts(q.dtype, D),
    )
