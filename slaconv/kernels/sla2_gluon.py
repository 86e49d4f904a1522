"""The sparse forward launch written in Gluon for Hopper (sm_90): an explicit producer / consumer split.

Same LUT, inputs and outputs as ``fwd_sparse_kernel`` with ``quant="none"`` (O mixed with the linear
branch from the routing block's H_rest / z_rest, 1/den per row and, if SAVE_LSE, the log2-sum-exp), 16-bit
inputs, head dim 64 or 128, 128-query routing blocks of 64-key blocks.  Where ``fwd_sparse_kernel`` leaves
the schedule to Triton, this kernel states it (FlashAttention-3's structure):

* one program per 128-row query tile, 12 warps: a **producer** partition (the default 4 warps, few
  registers) walks the tile's LUT row and issues TMA loads of the selected K and V blocks into a ring of
  ``STAGES`` shared-memory slots, each guarded by a ``ready`` mbarrier (bytes landed) and an ``empty``
  mbarrier (both consumers done with it);
* two **consumer** warpgroups of 64 query rows each (``setmaxnreg`` raises their registers) run the
  online softmax with asynchronous wgmma: S = Q K^T, exp2, O += P V;
* **ping-pong**: a pair of turn mbarriers lets only one consumer run its softmax at a time, so one
  warpgroup's exponentials overlap the other's tensor-core work;
* the epilogue of each consumer finishes the linear branch and mixes (:func:`mix_linear_tail`, the one
  place that knows the linear branch) and stores O through TMA.

Q, K, V and O are read and written through device-side tensor descriptors, one (N, D) view per (batch,
head) with the tensor's token stride, so both layouts work and a ragged last tile or key block reads zeros
past N (TMA bounds) and stores nothing there; logits of keys past N are set to -inf.  N and top-k are
runtime values: a new resolution or sparsity never recompiles.  The descriptors live in global scratch
from the allocator :func:`launch_sparse_gluon` installs (128 bytes each per program).

Selected with ``LaunchConfig(sparse_gluon=1)``; :func:`check_supported` raises
:class:`GluonUnavailableError` for what the kernel does not compute or the device cannot run.
Gluon kernels do not run under ``TRITON_INTERPRET``: CPU tests compile this one for sm_90a
(``tests/test_kernel_codegen.py``) and the GPU tests compare it with the reference (``tests/test_kernels.py``).
"""

from __future__ import annotations

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

from ..errors import UsageError
from .sla2_triton_ws import scratch_allocator

# Triton 3.6 names the TMA copies async_copy_global_to_shared / async_copy_shared_to_global; 3.8 adds
# async_load / async_store and 3.9 turns the old names into errors.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

GLUON_DTYPES = (torch.float16, torch.bfloat16)
GLUON_HEAD_DIMS = (64, 128)
GLUON_BLOCK_Q = 128
"""Query rows per program: two consumer warpgroups of 64 rows share one LUT row, so the routing block must
be the whole tile."""
GLUON_BLOCK_K = 64
"""Keys per selected block (one S tile of 64 x 64 per warpgroup and step)."""
PRODUCER_WARPS = 4
"""Warps of the default partition (the producer); each consumer warpgroup adds 4 more: 12 warps in all."""
CONSUMER_REGS = 240
"""Registers per thread the consumers claim with setmaxnreg; the producer keeps 24 (4 x 24 + 8 x 240 warps'
worth fits the SM's 64K registers at one program per SM)."""
SHARED_BYTES_LIMIT = 220 * 1024
"""Shared memory the ring may grow to (an H100 gives a program 227 KB): stages beyond it are dropped."""
LINEAR_EPS = gl.constexpr(1e-6)  # equal to reference.LINEAR_EPS


class GluonUnavailableError(UsageError):
    """The Gluon sparse launch was asked for where it cannot run: no Hopper GPU, or inputs it does not take."""


@gluon.jit
def mix_linear_tail(o_s, q, alpha, h_rest, z_rest_ptr, has_lin, D: gl.constexpr, O_LAYOUT: gl.constexpr):
    """The epilogue's linear branch and mix, for one warpgroup's 64 rows: the one function that knows how
    the tail beyond the selected blocks is estimated.

    ``o_s`` is the normalised sparse output (fp32, ``O_LAYOUT``), ``q`` the 16-bit Q rows in the same
    layout, ``h_rest`` the routing block's H_rest (D x D, shared memory) and ``z_rest_ptr`` its z_rest.
    Returns O = alpha O_s + psi H_rest with psi = (1 - alpha) phi(Q) / den, den = phi(Q) z_rest + eps
    (psi rounded to 16 bits before the MMA, as ``fwd_sparse_kernel`` does), and 1/den per row (0 when
    every block is selected: then the linear branch is exactly 0)."""
    qf = q.to(gl.float32)
    e = gl.exp(qf - gl.expand_dims(gl.max(qf, axis=1), 1))
    phi_q = e / gl.expand_dims(gl.sum(e, axis=1), 1)
    z_rest = gl.load(z_rest_ptr + gl.arange(0, D, layout=gl.SliceLayout(0, O_LAYOUT)))
    den = gl.sum(phi_q * gl.expand_dims(z_rest, 0), axis=1) + LINEAR_EPS
    inv_den = (has_lin != 0).to(gl.float32) / den
    psi = phi_q * gl.expand_dims((1.0 - alpha) * inv_den, 1)
    psi16 = gl.convert_layout(psi.to(q.dtype), gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2))
    return warpgroup_mma(psi16, h_rest, o_s * alpha), inv_den


@gluon.jit
def _producer(k_desc, v_desc, k_ring, v_ring, ready, empty, lut_row, n_sel,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA loads of the selected K and V blocks into the ring, ``STAGES`` ahead of the consumers."""
    for step in range(n_sel):
        slot = step % STAGES
        # a fresh mbarrier counts its phase before the first as complete: the first lap does not wait
        mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)
        block = gl.load(lut_row + step)
        mbarrier.expect(ready.index(slot), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [block * BLOCK_N, 0], ready.index(slot), k_ring.index(slot))
        _tma_load(v_desc, [block * BLOCK_N, 0], ready.index(slot), v_ring.index(slot))


@gluon.jit
def _consumer(q_tiles, k_ring, v_ring, h_rest, ready, empty, q_bar, h_bar, my_turn, their_turn, o_desc,
              lut_row, z_rest_ptr, ALPHA, LSE, INV_DEN, h, bh, row0, N, n_sel, qk_scale, has_lin,
              WG: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              SAVE_LSE: gl.constexpr):
    """One warpgroup's 64 query rows: the online softmax over the ring, then the epilogue."""
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    P_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2)
    S_ROW: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    O_ROW: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)

    q = q_tiles.index(WG)
    m_i = gl.full([64], float("-inf"), gl.float32, S_ROW)
    l_i = gl.zeros([64], gl.float32, S_ROW)
    acc = gl.zeros([64, D], gl.float32, O_LAYOUT)
    s_zero = gl.zeros([64, BLOCK_N], gl.float32, S_LAYOUT)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))
    turn_phase = 0
    mbarrier.wait(q_bar, 0)
    for step in range(n_sel):
        slot = step % STAGES
        mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
        s = warpgroup_mma(q, k_ring.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        block = gl.load(lut_row + step)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        # keys past N (the ragged last block) read as zeros through TMA: mask their logits
        s = gl.where(gl.expand_dims(cols < N - block * BLOCK_N, 0), s * qk_scale, float("-inf"))
        # ping-pong: one warpgroup at a time runs its exponentials while the other's MMAs proceed
        mbarrier.wait(my_turn, turn_phase)
        turn_phase ^= 1
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        rescale = gl.exp2(m_i - m_new)
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        mbarrier.arrive(their_turn)
        l_i = l_i * rescale + gl.sum(p, axis=1)
        m_i = m_new
        acc = acc * gl.expand_dims(gl.convert_layout(rescale, O_ROW), 1)
        p16 = gl.convert_layout(p.to(q.dtype), P_LAYOUT)
        acc = warpgroup_mma(p16, v_ring.index(slot), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty.index(slot))

    rows = row0 + WG * 64 + gl.arange(0, 64, layout=O_ROW)
    row_valid = rows < N
    if SAVE_LSE:
        gl.store(LSE + bh * N + rows, gl.convert_layout(m_i + gl.log2(l_i), O_ROW), mask=row_valid)
    o_s = acc / gl.expand_dims(gl.convert_layout(l_i, O_ROW), 1)
    mbarrier.wait(h_bar, 0)
    o, inv_den = mix_linear_tail(o_s, q.load(O_LAYOUT), gl.load(ALPHA + h), h_rest, z_rest_ptr, has_lin, D, O_LAYOUT)
    gl.store(INV_DEN + bh * N + rows, inv_den, mask=row_valid)
    # this warpgroup's Q rows are no longer read: their buffer stages O for the TMA store (clipped at N)
    q.store(o.to(q.dtype))
    fence_async_shared()
    _tma_store(o_desc, [row0 + WG * 64, 0], q)
    tma.store_wait(0)


@gluon.jit(do_not_specialize=["N", "H", "n_sel", "nq", "qk_scale", "has_lin"])
def fwd_sparse_gluon_kernel(
    Q, K, V, O, LUT, ALPHA, H_REST, Z_REST, LSE, INV_DEN,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    N, H, n_sel, nq, qk_scale, has_lin,
    D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SAVE_LSE: gl.constexpr,
    ROWS_LAYOUT: gl.constexpr, KV_LAYOUT: gl.constexpr, SQUARE_LAYOUT: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
):
    """One 128-row query tile (= one routing block) of one (batch, head): grid (tiles, B*H)."""
    tile = gl.program_id(0)
    bh = gl.program_id(1).to(gl.int64)
    b = bh // H
    h = bh % H
    row0 = tile * 128
    state = bh * nq + tile
    q_desc = tma.make_tensor_descriptor(Q + b * stride_qb + h * stride_qh, [N, D], [stride_qn, 1], [64, D],
                                        ROWS_LAYOUT)
    o_desc = tma.make_tensor_descriptor(O + b * stride_ob + h * stride_oh, [N, D], [stride_on, 1], [64, D],
                                        ROWS_LAYOUT)
    k_desc = tma.make_tensor_descriptor(K + b * stride_kb + h * stride_kh, [N, D], [stride_kn, 1], [BLOCK_N, D],
                                        KV_LAYOUT)
    v_desc = tma.make_tensor_descriptor(V + b * stride_vb + h * stride_vh, [N, D], [stride_vn, 1], [BLOCK_N, D],
                                        KV_LAYOUT)
    h_desc = tma.make_tensor_descriptor(H_REST + state * D * D, [D, D], [D, 1], [D, D], SQUARE_LAYOUT)
    dtype: gl.constexpr = Q.dtype.element_ty

    q_tiles = gl.allocate_shared_memory(dtype, [2, 64, D], ROWS_LAYOUT)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], KV_LAYOUT)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], KV_LAYOUT)
    h_rest = gl.allocate_shared_memory(dtype, [D, D], SQUARE_LAYOUT)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    h_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for slot in gl.static_range(STAGES):
        mbarrier.init(ready.index(slot), count=1)
        mbarrier.init(empty.index(slot), count=2)  # released by both consumers
    mbarrier.init(turns.index(0), count=1)
    mbarrier.init(turns.index(1), count=1)
    mbarrier.init(q_bar, count=1)
    mbarrier.init(h_bar, count=1)
    fence_async_shared()
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    _tma_load(q_desc, [row0, 0], q_bar, q_tiles.index(0))
    _tma_load(q_desc, [row0 + 64, 0], q_bar, q_tiles.index(1))
    mbarrier.expect(h_bar, h_desc.block_type.nbytes)
    _tma_load(h_desc, [0, 0], h_bar, h_rest)
    mbarrier.arrive(turns.index(0))  # consumer 0 takes the first softmax turn

    lut_row = LUT + state * n_sel
    z_rest_ptr = Z_REST + state * D
    gl.warp_specialize([
        (_producer, (k_desc, v_desc, k_ring, v_ring, ready, empty, lut_row, n_sel, BLOCK_N, STAGES)),
        (_consumer, (q_tiles, k_ring, v_ring, h_rest, ready, empty, q_bar, h_bar, turns.index(0), turns.index(1),
                     o_desc, lut_row, z_rest_ptr, ALPHA, LSE, INV_DEN, h, bh, row0, N, n_sel, qk_scale, has_lin,
                     0, D, BLOCK_N, STAGES, SAVE_LSE)),
        (_consumer, (q_tiles, k_ring, v_ring, h_rest, ready, empty, q_bar, h_bar, turns.index(1), turns.index(0),
                     o_desc, lut_row, z_rest_ptr, ALPHA, LSE, INV_DEN, h, bh, row0, N, n_sel, qk_scale, has_lin,
                     1, D, BLOCK_N, STAGES, SAVE_LSE)),
    ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])


def shared_bytes(head_dim: int, block_k: int, stages: int, elem_bytes: int = 2) -> int:
    """Shared memory of one program: Q (128 rows), the K/V ring and H_rest (the barriers are a few bytes)."""
    return elem_bytes * head_dim * (128 + 2 * stages * block_k + head_dim)


def ring_stages(head_dim: int, block_k: int, stages: int) -> int:
    """``stages`` slots, fewer if the ring would not fit :data:`SHARED_BYTES_LIMIT` (at least 2)."""
    while stages > 2 and shared_bytes(head_dim, block_k, stages) > SHARED_BYTES_LIMIT:
        stages -= 1
    return stages


def check_inputs(dtype: torch.dtype, head_dim: int, block_q: int, block_k: int, quant: str) -> None:
    """Raise :class:`GluonUnavailableError` (one line) unless the kernel computes this call."""
    if quant != "none":
        raise GluonUnavailableError(f"the Gluon sparse launch computes quant='none' only, got quant={quant!r}")
    if dtype not in GLUON_DTYPES:
        raise GluonUnavailableError(f"the Gluon sparse launch takes dtypes {GLUON_DTYPES}, got {dtype}")
    if head_dim not in GLUON_HEAD_DIMS:
        raise GluonUnavailableError(f"the Gluon sparse launch takes head dims {GLUON_HEAD_DIMS}, got {head_dim}")
    if block_q != GLUON_BLOCK_Q or block_k != GLUON_BLOCK_K:
        raise GluonUnavailableError(f"the Gluon sparse launch takes block_q={GLUON_BLOCK_Q} and "
                                    f"block_k={GLUON_BLOCK_K}, got block_q={block_q}, block_k={block_k}")


def check_device(device: torch.device) -> None:
    """Raise :class:`GluonUnavailableError` (one line) unless ``device`` is a Hopper GPU."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise GluonUnavailableError(f"the Gluon sparse launch needs a Hopper GPU (sm_90), got {where}")


def check_supported(device: torch.device, dtype: torch.dtype, head_dim: int, block_q: int, block_k: int,
                    quant: str) -> None:
    """:func:`check_inputs` and :func:`check_device`: what the forward calls before any launch."""
    check_inputs(dtype, head_dim, block_q, block_k, quant)
    check_device(device)


def shared_layouts(dtype: torch.dtype, head_dim: int, block_k: int) -> dict:
    """The NVMMA shared-memory layouts (swizzles) of the Q/O tiles, K/V blocks and H_rest: constexprs."""
    gl_dtype = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return {"ROWS_LAYOUT": gl.NVMMASharedLayout.get_default_for([64, head_dim], gl_dtype),
            "KV_LAYOUT": gl.NVMMASharedLayout.get_default_for([block_k, head_dim], gl_dtype),
            "SQUARE_LAYOUT": gl.NVMMASharedLayout.get_default_for([head_dim, head_dim], gl_dtype)}


def launch_sparse_gluon(grid, q, k, v, lut, alpha, h_rest, z_rest, o, lse, inv_den, strides, N, H, n_sel, nq,
                        qk_scale, has_lin, *, D: int, BLOCK_N: int, SAVE_LSE: bool, num_stages: int):
    """The sparse forward on ``grid`` (tiles of 128 rows, B*H) in one Gluon launch.  ``strides`` are the
    (batch, head, token) strides of q, k, v and o in that order; the other arguments are those of
    ``fwd_sparse_kernel`` (``lse`` may be any fp32 buffer when SAVE_LSE is false).  The caller has run
    :func:`check_supported`."""
    triton.set_allocator(scratch_allocator(q.device))
    fwd_sparse_gluon_kernel[grid](
        q, k, v, o, lut, alpha, h_rest, z_rest, lse, inv_den, *strides, N, H, n_sel, nq, qk_scale, has_lin,
        D=D, BLOCK_N=BLOCK_N, STAGES=ring_stages(D, BLOCK_N, num_stages), SAVE_LSE=SAVE_LSE,
        CONSUMER_REGS=CONSUMER_REGS, num_warps=PRODUCER_WARPS, **shared_layouts(q.dtype, D, BLOCK_N),
    )
