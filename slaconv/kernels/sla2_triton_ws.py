"""The sparse forward launch rebuilt for Triton's automatic warp specialization on Hopper (sm_90).

Same LUT, inputs and outputs as ``fwd_sparse_kernel`` with ``quant="none"`` (O mixed with the linear
branch, 1/den per row and, if SAVE_LSE, the log2-sum-exp), but every tile the MMAs read comes through a
device-side tensor descriptor (TMA) and the loop over the LUT row is ``tl.range(..., warp_specialize=True)``.
On sm_90 Triton then splits the program into a producer warp group that issues the TMA loads and two
consumer warp groups of 64 rows that run the MMAs and the softmax, which the plain loop of
``fwd_sparse_kernel`` does not get.  The split needs descriptors built on the device
(``tl.make_tensor_descriptor``: 128 bytes each, in scratch memory from the allocator
:func:`launch_sparse_ws` installs) and ``num_warps=4`` (Triton grows it to 12 warps);
``tests/test_kernel_codegen.py`` checks it happened, offline, with Triton 3.6 and 3.9.

One difference in structure: Triton's split (3.6 and 3.9) fails to compile when an MMA operand is computed
from a tile loaded in the program ("unsupported load type for producer commit"), or when a row reduction
reads such a tile, so the epilogue cannot compute phi(Q) and 1/den from Q as ``fwd_sparse_kernel`` does.
A row pass before it, :func:`psi_rows`, writes psi = (1 - alpha) phi(Q) / den (B*H x N x D, the input
dtype, rounded as the plain kernel rounds it before its mix MMA) and 1/den; the loop's epilogue reads psi
and H_rest by TMA and mixes, O = alpha O_s + psi H_rest, in one MMA.

Descriptors span one (batch, head) each, shape (N, D) with the tensor's token stride, so a ragged last
tile or key block reads zeros past N (TMA bounds); logits of keys past N are set to -inf as in the plain
kernel.  This is a separate, selectable launch path (:attr:`slaconv.kernels.launch.LaunchConfig.sparse_ws`),
not the default: the plain kernel stays the default until GPU timings say otherwise
(``benchmarks/bench_sparse_loop.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import sla2_triton_common as common
from . import sla2_triton_forward as forward_kernels

WS_WARPS = 4
"""Warps the launch asks for: at 4 Triton splits the loop (adding a producer and a second consumer group,
12 warps in all); at 8 it does not split it (offline compile, sm_90, Triton 3.9)."""

WS_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _rows_of(ptr, n_rows, row_stride, BLOCK: tl.constexpr, D: tl.constexpr):
    """A TMA descriptor over ``n_rows`` rows of D elements (unit column stride), ``BLOCK`` rows a tile."""
    return tl.make_tensor_descriptor(ptr, shape=[n_rows, D], strides=[row_stride, 1], block_shape=[BLOCK, D])


@triton.jit(do_not_specialize=["N", "H", "nq", "block_q", "has_lin"])
def psi_rows(
    Q, ALPHA, Z_REST, PSI, INV_DEN, stride_qb, stride_qh, stride_qn, N, H, nq, block_q, has_lin,
    D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Per query tile: the linear branch's row factor psi = (1 - alpha) phi(Q) / den, stored (B*H, N, D)
    in Q's dtype, and 1/den per row: the rows the sparse launch's epilogue multiplies with H_rest."""
    tile, bh, b, h = common.program_coords(H, D, BLOCK_M, BLOCK_M)
    rows, row_valid = common.block_rows(tile, BLOCK_M, N)
    q = common.load_rows(Q + b * stride_qb + h * stride_qh, rows, stride_qn, row_valid, D)
    state = bh * nq + (tile * BLOCK_M) // block_q
    psi, _ = forward_kernels.scaled_phi_rows(q, ALPHA, Z_REST, INV_DEN, h, bh, state, rows, row_valid, N, has_lin, D)
    common.store_rows(PSI + bh * N * D, rows, D, row_valid, psi, D)


@triton.jit(do_not_specialize=["N", "H", "n_sel", "nq", "block_q", "qk_scale"])
def fwd_sparse_ws_kernel(
    Q, K, V, LUT, ALPHA, PSI, H_REST, O, LSE,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    N, H, n_sel, nq, block_q, qk_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SAVE_LSE: tl.constexpr,
):
    """One query tile, 16-bit: the online softmax over its LUT row in a warp-specialized loop, then the mix
    O = alpha O_s + psi H_rest in one MMA, psi from :func:`psi_rows`."""
    tile, bh, b, h = common.program_coords(H, D, BLOCK_M, BLOCK_N)
    q_tiles = _rows_of(Q + b * stride_qb + h * stride_qh, N, stride_qn, BLOCK_M, D)
    k_blocks = _rows_of(K + b * stride_kb + h * stride_kh, N, stride_kn, BLOCK_N, D)
    v_blocks = _rows_of(V + b * stride_vb + h * stride_vh, N, stride_vn, BLOCK_N, D)
    state = bh * nq + (tile * BLOCK_M) // block_q
    q = q_tiles.load([tile * BLOCK_M, 0])

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    lut_row = LUT + state * n_sel
    for step in tl.range(0, n_sel, warp_specialize=True):
        block = tl.load(lut_row + step)
        k = k_blocks.load([block * BLOCK_N, 0])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
        s = tl.where((cols < N)[None, :], s, float("-inf"))
        p, m_i, l_i, acc = forward_kernels.softmax_step(s, m_i, l_i, acc)
        v = v_blocks.load([block * BLOCK_N, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)

    rows, row_valid = common.block_rows(tile, BLOCK_M, N)
    if SAVE_LSE:
        tl.store(LSE + bh * N + rows, m_i + tl.log2(l_i), mask=row_valid)
    # both MMA operands of the mix through TMA: the split fails on an operand computed from a loaded tile
    psi = _rows_of(PSI + bh * N * D, N, D, BLOCK_M, D).load([tile * BLOCK_M, 0])
    h_rest = _rows_of(H_REST + state * D * D, D, D, D, D).load([0, 0])
    o = tl.dot(psi, h_rest, tl.load(ALPHA + h) * (acc / l_i[:, None]))
    common.store_rows(O + b * stride_ob + h * stride_oh, rows, stride_on, row_valid, o, D)


def scratch_allocator(device: torch.device):
    """Triton's allocator for the kernel's global scratch: its device-side TMA descriptors, 128 bytes per
    descriptor and program, taken from torch's caching allocator on ``device``."""
    def allocate(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)

    return allocate


def check_supported(dtype: torch.dtype, quant: str) -> None:
    """Raise ``ValueError`` unless the warp-specialized launch covers this call (16-bit, ``quant="none"``)."""
    if quant != "none":
        raise ValueError(f"the warp-specialized sparse launch computes quant='none' only, got quant={quant!r}")
    if dtype not in WS_DTYPES:
        raise ValueError(f"the warp-specialized sparse launch takes dtypes {WS_DTYPES}, got {dtype}")


def launch_sparse_ws(grid, q, k, v, lut, alpha, h_rest, z_rest, o, lse, inv_den, strides, N, H, n_sel, nq, block_q,
                     qk_scale, has_lin, *, D: int, BLOCK_M: int, BLOCK_N: int, SAVE_LSE: bool, row_launch: dict,
                     loop_launch: dict):
    """The sparse forward on ``grid`` (tiles, B*H) in two launches: :func:`psi_rows` with the options
    ``row_launch``, then :func:`fwd_sparse_ws_kernel` with ``loop_launch`` (``num_warps`` must be
    :data:`WS_WARPS` for the split).  ``strides`` are the (batch, head, token) strides of q, k, v and o in
    that order; the other arguments are those of ``fwd_sparse_kernel``."""
    check_supported(q.dtype, "none")
    psi = torch.empty(grid[1], N, D, device=q.device, dtype=q.dtype)
    psi_rows[grid](q, alpha, z_rest, psi, inv_den, *strides[:3], N, H, nq, block_q, has_lin, D=D, BLOCK_M=BLOCK_M,
                   **row_launch)
    triton.set_allocator(scratch_allocator(q.device))
    fwd_sparse_ws_kernel[grid](
        q, k, v, lut, alpha, psi, h_rest, o, lse, *strides, N, H, n_sel, nq, block_q, qk_scale,
        D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SAVE_LSE=SAVE_LSE, **loop_launch,
    )
