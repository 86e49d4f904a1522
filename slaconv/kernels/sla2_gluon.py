"""The sparse forward launch written in Gluon for Hopper (sm_90): an explicit producer / consumer split.

Same LUT, inputs and outputs as ``fwd_sparse_kernel`` with ``quant="none"`` or ``"int8-fp8"`` (O mixed with
the linear branch from the routing block's H_rest / z_rest, 1/den per row and, if SAVE_LSE, the
log2-sum-exp), 16-bit inputs, head dim 64 or 128, 128-query routing blocks of 64-key blocks.  ``int8-fp8``
reads the forward's INT8 Q / K - mean(K) and FP8 V^T copies: QK^T as INT8 wgmma, PV as FP8 wgmma.  Where ``fwd_sparse_kernel`` leaves
the schedule to Triton, this kernel states it (FlashAttention-3's structure):

* **persistent**: the work items (one 128-row query tile of one (batch, head) each, tile-fastest) are
  spread over one program per SM, each looping over its items; a program has 12 warps: a **producer**
  partition (the default 4 warps, few registers) issues the TMA loads of each item's Q tile, its selected
  K and V blocks into a ring of ``STAGES`` shared-memory slots (``ready`` mbarriers count the bytes in,
  ``empty`` mbarriers wait for both consumers) and its H_rest.  The ring runs on across items, so the
  next tile's Q and first K/V blocks load while the consumers finish the current tile;
* two **consumer** warpgroups of 64 query rows each (``setmaxnreg`` raises their registers) first turn
  their Q rows into the linear branch's weights psi (staged in shared memory, which frees the Q buffer
  after the last QK^T), then run the online softmax with asynchronous wgmma;
* **intra-warpgroup overlap** (``OVERLAP``): QK^T of block j+1 and PV of block j are in flight while the
  exponentials of block j+1 run (FlashAttention-3's two-stage pipeline);
* **ping-pong**: a pair of turn mbarriers lets only one consumer run its exponentials at a time, so one
  warpgroup's softmax overlaps the other's tensor-core work;
* Hedgehog features of Q come from the q pre-pass, or (``query_weights``) from one more wgmma per warpgroup
  on the Q tile and the head's weights, which the producer loads into the H_rest buffer before H_rest;
* the epilogue mixes in one wgmma, O = alpha O_s + psi H_rest (``linear_tail_weights`` is the one
  place that knows the linear branch), and stores O through TMA from the psi buffer.

This module holds the kernel (shared memory, barriers, descriptors, the split) and its host side; the
partitions are in ``sla2_gluon_partitions.py``.

Q, K, V and O are read and written through device-side 4-d tensor descriptors, (batch, head, token, dim)
with the tensor's strides, made once per program: both layouts work, and a ragged last tile or key block
reads zeros past N (TMA bounds) and stores nothing there; logits of keys past N are set to -inf.  N and
top-k are runtime values: a new resolution or sparsity never recompiles.  The descriptors live in global
scratch from the allocator :func:`launch_sparse_gluon` installs (128 bytes each per program).

Selected by the default ``LaunchConfig(sparse_gluon=2)`` where it :func:`applies` (the plain launch
elsewhere), or always with ``sparse_gluon=1``, where :func:`check_supported` raises
:class:`GluonUnavailableError` for what the kernel does not compute or the device cannot run.
Gluon kernels do not run under ``TRITON_INTERPRET``: CPU tests compile this one for sm_90a
(``tests/test_kernel_codegen.py``) and the GPU tests compare it with the reference (``tests/test_kernels.py``).
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
)

from ..errors import UsageError
from .sla2_gluon_partitions import consumer, producer
from .sla2_triton_ws import scratch_allocator

GLUON_DTYPES = (torch.float16, torch.bfloat16)
GLUON_HEAD_DIMS = (64, 128)
GLUON_QUANT_MODES = ("none", "int8-fp8")
GLUON_QUANT_IDS = {"none": 0, "int8-fp8": 2}  # the QUANT ids of fwd_sparse_kernel
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
CONSUMER_REGS_QUERY_FEATURES = 232
"""The consumers' registers where the launch computes Hedgehog phi(Q) itself: the producer, which then also
places the weights, gets 40 instead of 24 (4 x 40 + 8 x 232 warps' worth still fits 64K); at 24 it spills."""
SHARED_BYTES_LIMIT = 227 * 1024 - 2048
"""Shared memory the tiles and the ring may fill: an H100 gives a program 227 KiB, less room for the
mbarriers and alignment.  Slots beyond it are dropped."""
GLUON_RING_SLOTS = 4
"""K/V slots of the ring (fewer where shared memory runs out: D = 128 fits 4).  The overlapped loop holds
two slots per consumer (PV(j) and QK^T(j+1) in flight), so the producer's lead is the rest: two blocks at
4 slots, one at 3."""


class GluonUnavailableError(UsageError):
    """The Gluon sparse launch was asked for where it cannot run: no Hopper GPU, or inputs it does not take."""


@gluon.jit(do_not_specialize=["N", "B", "H", "n_sel", "nq", "nk", "npad", "qk_scale", "inv_n", "has_lin", "lin_div"])
def fwd_sparse_gluon_kernel(
    Q, K, V, O, LUT, ALPHA, H_REST, Z_REST, LSE, INV_DEN, Q_INT8, Q_SCALE, K_INT8, K_SCALE, V_FP8, V_ABSMAX, K_SUM,
    PHI_Q, LSE_TAIL, ALPHA_ROWS,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    N, B, H, n_sel, nq, nk, npad, qk_scale, inv_n, has_lin, lin_div,
    D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SAVE_LSE: gl.constexpr, OVERLAP: gl.constexpr,
    QUANT: gl.constexpr, HEDGEHOG: gl.constexpr, MIX_ROWS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    ROWS_LAYOUT: gl.constexpr, KV_LAYOUT: gl.constexpr, SQUARE_LAYOUT: gl.constexpr,
    ROWS4_LAYOUT: gl.constexpr, KV4_LAYOUT: gl.constexpr, Q8_LAYOUT: gl.constexpr, Q8_BOX_LAYOUT: gl.constexpr,
    K8_LAYOUT: gl.constexpr, K8_BOX_LAYOUT: gl.constexpr, V8_LAYOUT: gl.constexpr, V8_BOX_LAYOUT: gl.constexpr,
    P8_LAYOUT: gl.constexpr,
    S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr, P_LAYOUT: gl.constexpr, MIX_LAYOUT: gl.constexpr,
):
    """The B*H*nq work items (one 128-row query tile = one routing block of one (batch, head)) on a 1-d grid
    of any size: program p runs items p, p + P, p + 2P, ...  (P programs: as many as SMs for the persistent
    schedule, one per item for the plain one).  QUANT == 2 (``int8-fp8``) reads the forward's INT8 Q and K
    and FP8 V^T copies (Q_INT8 ... K_SUM); otherwise those arguments are not read.  HEDGEHOG == 1 reads phi(Q)
    from PHI_Q; HEDGEHOG == 2 computes it from Q and the signed weight stacks PHI_Q (H, D, D).  MIX_ROWS mixes
    with alpha per row from LSE_TAIL (ALPHA then holds the heads' logits; MIX_ROWS == 2: LSE_TAIL holds each
    row's whole logit) and, with SAVE_LSE, stores it in ALPHA_ROWS; otherwise those are not read.  H_REST /
    Z_REST hold the linear state of work item i at i // lin_div: one per routing block (1) or one per (batch,
    head) (nq)."""
    q_desc = tma.make_tensor_descriptor(Q, [B, H, N, D], [stride_qb, stride_qh, stride_qn, 1], [1, 1, 64, D],
                                        ROWS4_LAYOUT)
    o_desc = tma.make_tensor_descriptor(O, [B, H, N, D], [stride_ob, stride_oh, stride_on, 1], [1, 1, 64, D],
                                        ROWS4_LAYOUT)
    n_items = B * H * nq
    h_desc = tma.make_tensor_descriptor(H_REST, [(n_items // lin_div) * D, D], [D, 1], [D, D], SQUARE_LAYOUT)
    if HEDGEHOG == 2:  # PHI_Q holds the signed weight stacks (H, D, D)
        w_desc = tma.make_tensor_descriptor(PHI_Q, [H * D, D], [D, 1], [D, D], SQUARE_LAYOUT)
    else:
        w_desc = h_desc
    dtype: gl.constexpr = Q.dtype.element_ty
    q_tiles = gl.allocate_shared_memory(dtype, [2, 64, D], ROWS_LAYOUT)
    if QUANT == 2:
        q8_desc = tma.make_tensor_descriptor(Q_INT8, [B * H, N, D], [N * D, D, 1], [1, 64, D], Q8_BOX_LAYOUT)
        k_desc = tma.make_tensor_descriptor(K_INT8, [B * H, N, D], [N * D, D, 1], [1, BLOCK_N, D], K8_BOX_LAYOUT)
        v_desc = tma.make_tensor_descriptor(V_FP8, [B * H, D, npad], [D * npad, npad, 1], [1, D, BLOCK_N],
                                            V8_BOX_LAYOUT)
        q8_tiles = gl.allocate_shared_memory(gl.int8, [2, 64, D], Q8_LAYOUT)
        k_ring = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, D], K8_LAYOUT)
        v_ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, D, BLOCK_N], V8_LAYOUT)
        p_tiles = gl.allocate_shared_memory(gl.float8e4nv, [2, 64, BLOCK_N], P8_LAYOUT)
    else:
        k_desc = tma.make_tensor_descriptor(K, [B, H, N, D], [stride_kb, stride_kh, stride_kn, 1], [1, 1, BLOCK_N, D],
                                            KV4_LAYOUT)
        v_desc = tma.make_tensor_descriptor(V, [B, H, N, D], [stride_vb, stride_vh, stride_vn, 1], [1, 1, BLOCK_N, D],
                                            KV4_LAYOUT)
        q8_desc = q_desc
        q8_tiles = q_tiles
        k_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], KV_LAYOUT)
        v_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], KV_LAYOUT)
        p_tiles = q_tiles  # P stays in registers
    staging = gl.allocate_shared_memory(dtype, [2, 64, D], ROWS_LAYOUT)  # psi, then O
    h_rest = gl.allocate_shared_memory(dtype, [D, D], SQUARE_LAYOUT)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    tile_bars = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
    q_ready, q_free, h_ready, h_free = tile_bars.index(0), tile_bars.index(1), tile_bars.index(2), tile_bars.index(3)
    for slot in gl.static_range(STAGES):
        mbarrier.init(ready.index(slot), count=1)
        mbarrier.init(empty.index(slot), count=2)  # released by both consumers
    mbarrier.init(turns.index(0), count=1)
    mbarrier.init(turns.index(1), count=1)
    mbarrier.init(q_ready, count=1)
    mbarrier.init(q_free, count=2)
    mbarrier.init(h_ready, count=1)
    mbarrier.init(h_free, count=2)
    fence_async_shared()
    mbarrier.arrive(turns.index(0))  # consumer 0 takes the first softmax turn

    gl.warp_specialize([
        (producer, (q_desc, q8_desc, k_desc, v_desc, h_desc, w_desc, q_tiles, q8_tiles, k_ring, v_ring, h_rest,
                    ready, empty, q_ready, q_free, h_ready, h_free, LUT, n_items, nq, H, n_sel, lin_div, D, BLOCK_N,
                    STAGES, QUANT, HEDGEHOG)),
        (consumer, (q_tiles, q8_tiles, p_tiles, staging, k_ring, v_ring, h_rest, ready, empty, q_ready, q_free, h_ready, h_free,
                    turns.index(0), turns.index(1), o_desc, LUT, Z_REST, ALPHA, LSE, INV_DEN, Q_SCALE, K_SCALE,
                    V_ABSMAX, K_SUM, PHI_Q, LSE_TAIL, ALPHA_ROWS, n_items, nq, nk, H, N, n_sel, qk_scale, inv_n,
                    has_lin, lin_div, 0, D, BLOCK_N, STAGES, SAVE_LSE, OVERLAP, QUANT, HEDGEHOG, MIX_ROWS, S_LAYOUT, O_LAYOUT,
                    P_LAYOUT, MIX_LAYOUT)),
        (consumer, (q_tiles, q8_tiles, p_tiles, staging, k_ring, v_ring, h_rest, ready, empty, q_ready, q_free, h_ready, h_free,
                    turns.index(1), turns.index(0), o_desc, LUT, Z_REST, ALPHA, LSE, INV_DEN, Q_SCALE, K_SCALE,
                    V_ABSMAX, K_SUM, PHI_Q, LSE_TAIL, ALPHA_ROWS, n_items, nq, nk, H, N, n_sel, qk_scale, inv_n,
                    has_lin, lin_div, 1, D, BLOCK_N, STAGES, SAVE_LSE, OVERLAP, QUANT, HEDGEHOG, MIX_ROWS, S_LAYOUT, O_LAYOUT,
                    P_LAYOUT, MIX_LAYOUT)),
    ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])


def shared_bytes(head_dim: int, block_k: int, stages: int, quant: str = "none") -> int:
    """Shared memory of one program: the 16-bit Q and psi / O staging tiles (128 rows each) and H_rest, the
    K/V ring (1-byte elements for ``int8-fp8``, which also keeps the INT8 Q tile and the FP8 P tiles); the
    barriers are a few bytes."""
    lowbit = quant == "int8-fp8"
    ring = stages * 2 * block_k * head_dim * (1 if lowbit else 2)
    return 2 * head_dim * (2 * 128 + head_dim) + ring + ((128 * head_dim + 128 * block_k) if lowbit else 0)


def ring_stages(head_dim: int, block_k: int, stages: int = GLUON_RING_SLOTS, quant: str = "none") -> int:
    """``stages`` slots, fewer if the ring would not fit :data:`SHARED_BYTES_LIMIT` (at least 2)."""
    while stages > 2 and shared_bytes(head_dim, block_k, stages, quant) > SHARED_BYTES_LIMIT:
        stages -= 1
    return stages


def check_inputs(dtype: torch.dtype, head_dim: int, block_q: int, block_k: int, quant: str) -> None:
    """Raise :class:`GluonUnavailableError` (one line) unless the kernel computes this call."""
    if quant not in GLUON_QUANT_MODES:
        raise GluonUnavailableError(f"the Gluon sparse launch computes quant in {GLUON_QUANT_MODES}, got {quant!r}")
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


def check_tma_operands(tensors) -> None:
    """Raise :class:`GluonUnavailableError` (one line) unless TMA can read every tensor: a 16-byte aligned start
    and every stride but the last a positive multiple of 16 bytes (a tensor broadcast over a dimension has
    stride 0 there; every layout diffusers passes qualifies)."""
    for t in tensors:
        if t.data_ptr() % 16 or any(s <= 0 or s * t.element_size() % 16 for s in t.stride()[:-1]):
            raise GluonUnavailableError(f"the Gluon launches read through TMA, which needs 16-byte aligned tensors "
                                        f"and strides; got strides {tuple(t.stride())}")


def check_supported(device: torch.device, dtype: torch.dtype, head_dim: int, block_q: int, block_k: int,
                    quant: str, tensors=()) -> None:
    """:func:`check_inputs`, :func:`check_tma_operands` on ``tensors`` and :func:`check_device`: what the forward
    calls before any launch."""
    check_inputs(dtype, head_dim, block_q, block_k, quant)
    check_tma_operands(tensors)
    check_device(device)


def applies(device: torch.device, dtype: torch.dtype, head_dim: int, block_q: int, block_k: int, quant: str,
            tensors=()) -> bool:
    """Whether the kernel computes this call on this device (``LaunchConfig.sparse_gluon=2`` picks it then)."""
    try:
        check_supported(device, dtype, head_dim, block_q, block_k, quant, tensors)
    except GluonUnavailableError:
        return False
    return True


@functools.cache
def kernel_layouts(dtype: torch.dtype, head_dim: int, block_k: int, quant: str) -> dict:
    """The kernel's layout constexprs (built once per argument set: every launch would otherwise pay for them on
    the host): NVMMA shared layouts (swizzles) of the Q / psi / O tiles, K/V blocks and
    H_rest, of the same tiles as boxes of the 4-d descriptors, of the INT8 / FP8 tiles and their 3-d boxes;
    and the wgmma register layouts of S, O and P (8-bit operands take k = 32 and P k_width 4) and of the
    16-bit mix."""
    gl_dtype = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    shared = gl.NVMMASharedLayout.get_default_for
    k_step, p_width = (32, 4) if quant == "int8-fp8" else (16, 2)

    def mma(n, k):
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, k])

    o_layout = mma(head_dim, k_step)
    return {"ROWS_LAYOUT": shared([64, head_dim], gl_dtype), "KV_LAYOUT": shared([block_k, head_dim], gl_dtype),
            "SQUARE_LAYOUT": shared([head_dim, head_dim], gl_dtype),
            "ROWS4_LAYOUT": shared([1, 1, 64, head_dim], gl_dtype),
            "KV4_LAYOUT": shared([1, 1, block_k, head_dim], gl_dtype),
            "Q8_LAYOUT": shared([64, head_dim], gl.int8), "Q8_BOX_LAYOUT": shared([1, 64, head_dim], gl.int8),
            "K8_LAYOUT": shared([block_k, head_dim], gl.int8),
            "K8_BOX_LAYOUT": shared([1, block_k, head_dim], gl.int8),
            "V8_LAYOUT": shared([head_dim, block_k], gl.float8e4nv),
            "V8_BOX_LAYOUT": shared([1, head_dim, block_k], gl.float8e4nv),
            "P8_LAYOUT": shared([64, block_k], gl.float8e4nv),
            "S_LAYOUT": mma(block_k, k_step), "O_LAYOUT": o_layout,
            "P_LAYOUT": gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=p_width),
            "MIX_LAYOUT": mma(head_dim, 16)}


def persistent_programs(n_items: int, device: torch.device) -> int:
    """Programs of the persistent schedule: one per SM (the shared memory of one program fills an SM), at
    most one per item.  Off a GPU (the offline compile report) every item gets a program."""
    if device.type != "cuda":
        return n_items
    return min(n_items, torch.cuda.get_device_properties(device).multi_processor_count)


def launch_sparse_gluon(grid, q, k, v, lut, alpha, h_rest, z_rest, o, lse, inv_den, lowbit, strides, N, H, n_sel,
                        nq, nk, qk_scale, has_lin, *, D: int, BLOCK_N: int, SAVE_LSE: bool, quant: str = "none",
                        phi_q=None, query_weights=None, lse_tail=None, row_logits=None, alpha_rows=None,
                        lin_per_head: bool = False,
                        persistent: bool = True, overlap: bool = True, ring_slots: int = GLUON_RING_SLOTS):
    """The sparse forward for ``grid`` = (tiles of 128 rows, B*H) work items in one Gluon launch.  ``strides``
    are the (batch, head, token) strides of q, k, v and o in that order; ``lowbit`` is the forward's
    (q_int8, q_scale, k_int8, k_scale, v_fp8 (B*H, D, npad), v_absmax, k_sum), read for
    ``quant="int8-fp8"`` only; the other arguments are those of ``fwd_sparse_kernel`` (``lse`` may be any
    fp32 buffer when SAVE_LSE is false).  ``persistent``: one program per SM loops over the items (else one
    program per item); ``overlap``: QK^T(j+1) runs during softmax(j) (else each MMA is waited for at once);
    ``ring_slots``: K/V slots (:func:`ring_stages`).  The linear-branch options, as ``fwd_sparse_kernel`` takes
    them: ``phi_q`` (B*H, N, D) Hedgehog features of Q from the q pre-pass, or ``query_weights`` (H, D, D) the
    signed weight stacks the kernel computes them from (neither: softmax over the head dim);
    ``lse_tail`` (B*H, N) for alpha per row (None: alpha per head), ``alpha`` then the heads' logits, or
    ``row_logits`` (B*H, N) the rows' whole alpha logits (``mixing: query-linear``), and
    ``alpha_rows`` (B*H, N) where SAVE_LSE stores it.  ``lin_per_head``: ``h_rest`` / ``z_rest`` are one
    state per (batch, head) (the linear branch over every key block).  The caller has run
    :func:`check_supported`."""
    if phi_q is not None and query_weights is not None:
        raise ValueError("phi_q and query_weights are two sources of the same features: give one")
    hedgehog = 1 if phi_q is not None else 2 if query_weights is not None else 0
    if lse_tail is not None and row_logits is not None:
        raise ValueError("lse_tail and row_logits are two sources of alpha per row: give one")
    mix_rows = 1 if lse_tail is not None else 2 if row_logits is not None else 0
    if mix_rows and SAVE_LSE and alpha_rows is None:
        raise ValueError("alpha per row with SAVE_LSE needs alpha_rows to store it in")
    tiles, bh = grid
    n_items = tiles * bh
    programs = persistent_programs(n_items, q.device) if persistent else n_items
    triton.set_allocator(scratch_allocator(q.device))
    fwd_sparse_gluon_kernel[(programs, )](
        q, k, v, o, lut, alpha, h_rest, z_rest, lse, inv_den, *lowbit,
        phi_q if hedgehog == 1 else query_weights if hedgehog == 2 else q,
        lse_tail if mix_rows == 1 else row_logits if mix_rows == 2 else inv_den,
        alpha_rows if mix_rows and SAVE_LSE else inv_den,
        *strides, N, bh // H, H, n_sel, nq, nk, nk * BLOCK_N, qk_scale, 1.0 / N, has_lin, nq if lin_per_head else 1,
        D=D, BLOCK_N=BLOCK_N, STAGES=ring_stages(D, BLOCK_N, ring_slots, quant), SAVE_LSE=SAVE_LSE, OVERLAP=overlap,
        QUANT=GLUON_QUANT_IDS[quant], HEDGEHOG=hedgehog, MIX_ROWS=mix_rows,
        CONSUMER_REGS=CONSUMER_REGS_QUERY_FEATURES if hedgehog == 2 else CONSUMER_REGS,
        num_warps=PRODUCER_WARPS,
        **kernel_layouts(q.dtype, D, BLOCK_N, quant),
    )
