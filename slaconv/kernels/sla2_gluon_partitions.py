"""The partitions of the Gluon sparse forward (``sla2_gluon.py``): the TMA producer and the consumer
warpgroups with their two loops (serial, and QK^T(j+1) overlapping softmax(j)) and the epilogue.

The protocol between them, per program (one ring and one set of mbarriers for all of its work items):
``ready`` / ``empty`` per K/V slot, ``q_ready`` / ``q_free`` for the Q tile (free once both consumers are
past the item's last QK^T), ``h_ready`` / ``h_free`` for H_rest (free once both have mixed), and two turn
mbarriers for the ping-pong of the exponentials.  A fresh mbarrier counts its phase before the first as
complete, so the first waits on the free / empty barriers pass at once.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# Triton 3.6 names the TMA copies async_copy_global_to_shared / async_copy_shared_to_global; 3.8 adds
# async_load / async_store and 3.9 turns the old names into errors.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

LINEAR_EPS = gl.constexpr(1e-6)  # equal to reference.LINEAR_EPS


@gluon.jit
def linear_tail_weights(q, alpha, z_rest_ptr, has_lin, D: gl.constexpr, LAYOUT: gl.constexpr):
    """The linear branch's row weights for one warpgroup's 64 rows: the one function that knows how the tail
    beyond the selected blocks is estimated (the epilogue then adds psi H_rest to alpha O_s in one MMA).

    ``q`` is the 16-bit Q rows (``LAYOUT``), ``z_rest_ptr`` the routing block's z_rest.  Returns
    psi = (1 - alpha) phi(Q) / den (fp32; the caller rounds it to 16 bits for the MMA, as
    ``fwd_sparse_kernel`` does) with den = phi(Q) z_rest + eps, and 1/den per row (0 when every block is
    selected: then the linear branch is exactly 0)."""
    qf = q.to(gl.float32)
    e = gl.exp(qf - gl.expand_dims(gl.max(qf, axis=1), 1))
    phi_q = e / gl.expand_dims(gl.sum(e, axis=1), 1)
    z_rest = gl.load(z_rest_ptr + gl.arange(0, D, layout=gl.SliceLayout(0, LAYOUT)))
    den = gl.sum(phi_q * gl.expand_dims(z_rest, 0), axis=1) + LINEAR_EPS
    inv_den = (has_lin != 0).to(gl.float32) / den
    return phi_q * gl.expand_dims((1.0 - alpha) * inv_den, 1), inv_den


@gluon.jit
def work_item(item, nq, H):
    """Work item -> (query tile, batch, head).  Items run tile-fastest, so the programs resident at one time
    work on few heads and share their K and V blocks in L2."""
    bh = item // nq
    return item % nq, bh // H, bh % H


@gluon.jit
def tile4(buf, ROWS: gl.constexpr, D: gl.constexpr):
    """A (ROWS, D) shared tile as the (1, 1, ROWS, D) box of the 4-d (batch, head, token, dim) descriptors:
    a reshape that keeps the bytes and the swizzle."""
    return buf.reshape([1, 1, ROWS, D])


@gluon.jit
def producer(q_desc, k_desc, v_desc, h_desc, q_tiles, k_ring, v_ring, h_rest, ready, empty, q_ready, q_free,
              h_ready, h_free, LUT, n_items, nq, H, n_sel,
              D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA loads, item after item: the tile's Q once both consumers are past their last QK^T of the previous
    tile, its selected K and V blocks into the ring (one ring for all items, so the next tile's first blocks
    arrive while the consumers finish the current one), then its H_rest once the previous mix is done.
    A fresh mbarrier counts its phase before the first as complete: the first waits on the free/empty
    barriers pass at once."""
    step = 0
    lap = 0
    for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
        tile, b, h = work_item(item, nq, H)
        mbarrier.wait(q_free, (lap & 1) ^ 1)
        mbarrier.expect(q_ready, 2 * q_desc.block_type.nbytes)
        for half in gl.static_range(2):
            _tma_load(q_desc, [b, h, tile * 128 + half * 64, 0], q_ready, tile4(q_tiles.index(half), 64, D))
        lut_row = LUT + item.to(gl.int64) * n_sel
        for j in range(n_sel):
            slot = step % STAGES
            mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)
            block = gl.load(lut_row + j)
            mbarrier.expect(ready.index(slot), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            _tma_load(k_desc, [b, h, block * BLOCK_N, 0], ready.index(slot),
                      tile4(k_ring.index(slot), BLOCK_N, D))
            _tma_load(v_desc, [b, h, block * BLOCK_N, 0], ready.index(slot),
                      tile4(v_ring.index(slot), BLOCK_N, D))
            step += 1
        mbarrier.wait(h_free, (lap & 1) ^ 1)
        mbarrier.expect(h_ready, h_desc.block_type.nbytes)
        _tma_load(h_desc, [item * D, 0], h_ready, h_rest)
        lap += 1


@gluon.jit
def masked_logits(s, block, cols, N, qk_scale, BLOCK_N: gl.constexpr):
    """Scaled logits of key block ``block``; keys past N (the ragged last block, zeros through TMA) -> -inf."""
    return gl.where(gl.expand_dims(cols < N - block * BLOCK_N, 0), s * qk_scale, float("-inf"))


@gluon.jit
def softmax_step(s, m_i, l_i, my_turn, their_turn, turn_phase):
    """One block's online-softmax update: (P, new row max, new row sum, rescale of the old accumulator, turn
    phase).  Ping-pong: one warpgroup at a time runs its exponentials while the other's MMAs proceed."""
    mbarrier.wait(my_turn, turn_phase)
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    rescale = gl.exp2(m_i - m_new)
    p = gl.exp2(s - gl.expand_dims(m_new, 1))
    mbarrier.arrive(their_turn)
    return p, m_new, l_i * rescale + gl.sum(p, axis=1), rescale, turn_phase ^ 1


@gluon.jit
def serial_loop(q, k_ring, v_ring, ready, empty, q_free, my_turn, their_turn, lut_row, N, n_sel, qk_scale,
                 step, turn_phase, D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The online softmax with every MMA waited for at once: QK^T(j), softmax(j), PV(j), in turn."""
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    P_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2)
    m_i = gl.full([64], float("-inf"), gl.float32, gl.SliceLayout(1, S_LAYOUT))
    l_i = gl.zeros([64], gl.float32, gl.SliceLayout(1, S_LAYOUT))
    acc = gl.zeros([64, D], gl.float32, O_LAYOUT)
    s_zero = gl.zeros([64, BLOCK_N], gl.float32, S_LAYOUT)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))
    for j in range(n_sel):
        slot = step % STAGES
        mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
        s = warpgroup_mma(q, k_ring.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        block = gl.load(lut_row + j)  # its latency hides behind the MMA
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        mbarrier.arrive(q_free, pred=j == n_sel - 1)
        s = masked_logits(s, block, cols, N, qk_scale, BLOCK_N)
        p, m_i, l_i, rescale, turn_phase = softmax_step(s, m_i, l_i, my_turn, their_turn, turn_phase)
        acc = acc * gl.expand_dims(gl.convert_layout(rescale, gl.SliceLayout(1, O_LAYOUT)), 1)
        p16 = gl.convert_layout(p.to(q.dtype), P_LAYOUT)
        acc = warpgroup_mma(p16, v_ring.index(slot), acc, is_async=True)
        acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))
        mbarrier.arrive(empty.index(slot))
        step += 1
    return acc, m_i, l_i, step, turn_phase


@gluon.jit
def pipelined_loop(q, k_ring, v_ring, ready, empty, q_free, my_turn, their_turn, lut_row, N, n_sel, qk_scale,
                    step, turn_phase, D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The online softmax with QK^T(j+1) and PV(j) in flight while the softmax of block j+1 runs
    (FlashAttention-3's intra-warpgroup overlap): per step, issue QK^T(j+1) then PV(j), wait for the first,
    run the exponentials, wait for the second, rescale.  The accumulator absorbs PV(j) under the old row
    maximum before the rescale, so O_j = (O_{j-1} + P_j V_j) exp2(m_j - m_{j+1}) as in the serial loop."""
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    P_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2)
    s_zero = gl.zeros([64, BLOCK_N], gl.float32, S_LAYOUT)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))

    slot = step % STAGES
    mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
    s = warpgroup_mma(q, k_ring.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    block = gl.load(lut_row)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    mbarrier.arrive(q_free, pred=n_sel == 1)
    s = masked_logits(s, block, cols, N, qk_scale, BLOCK_N)
    p, m_i, l_i, _, turn_phase = softmax_step(s, gl.full([64], float("-inf"), gl.float32, gl.SliceLayout(1, S_LAYOUT)),
                                               gl.zeros([64], gl.float32, gl.SliceLayout(1, S_LAYOUT)), my_turn,
                                               their_turn, turn_phase)
    p16 = gl.convert_layout(p.to(q.dtype), P_LAYOUT)
    acc = gl.zeros([64, D], gl.float32, O_LAYOUT)
    for j in range(1, n_sel):
        next_slot = (step + 1) % STAGES
        mbarrier.wait(ready.index(next_slot), ((step + 1) // STAGES) & 1)
        s = warpgroup_mma(q, k_ring.index(next_slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        acc = warpgroup_mma(p16, v_ring.index(slot), acc, is_async=True)
        block = gl.load(lut_row + j)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))  # groups retire in order: QK^T(j) is done
        mbarrier.arrive(q_free, pred=j == n_sel - 1)
        s = masked_logits(s, block, cols, N, qk_scale, BLOCK_N)
        p, m_i, l_i, rescale, turn_phase = softmax_step(s, m_i, l_i, my_turn, their_turn, turn_phase)
        acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))
        mbarrier.arrive(empty.index(slot))
        acc = acc * gl.expand_dims(gl.convert_layout(rescale, gl.SliceLayout(1, O_LAYOUT)), 1)
        p16 = gl.convert_layout(p.to(q.dtype), P_LAYOUT)
        step += 1
        slot = next_slot
    acc = warpgroup_mma(p16, v_ring.index(slot), acc, is_async=True)
    acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))
    mbarrier.arrive(empty.index(slot))
    return acc, m_i, l_i, step + 1, turn_phase


@gluon.jit
def consumer(q_tiles, staging, k_ring, v_ring, h_rest, ready, empty, q_ready, q_free, h_ready, h_free,
              my_turn, their_turn, o_desc, LUT, Z_REST, ALPHA, LSE, INV_DEN, n_items, nq, H, N, n_sel, qk_scale,
              has_lin, WG: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              SAVE_LSE: gl.constexpr, OVERLAP: gl.constexpr):
    """One warpgroup's 64 query rows of each item: psi from Q first (staged in shared memory for the mix, so
    the Q buffer is free for the next tile as soon as the last QK^T is done), the online softmax over the
    ring, then the mix O = alpha O_s + psi H_rest and the TMA store of O from the same staging buffer."""
    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    O_ROW: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
    q = q_tiles.index(WG)
    stage = staging.index(WG)
    step = 0
    lap = 0
    turn_phase = 0
    for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
        tile, b, h = work_item(item, nq, H)
        bh = item.to(gl.int64) // nq
        rows = tile * 128 + WG * 64 + gl.arange(0, 64, layout=O_ROW)
        row_valid = rows < N
        alpha = gl.load(ALPHA + h)
        mbarrier.wait(q_ready, lap & 1)
        psi, inv_den = linear_tail_weights(q.load(O_LAYOUT), alpha, Z_REST + item.to(gl.int64) * D, has_lin, D,
                                           O_LAYOUT)
        gl.store(INV_DEN + bh * N + rows, inv_den, mask=row_valid)
        tma.store_wait(0)  # the previous item's O has left the staging buffer
        stage.store(psi.to(q.dtype))
        fence_async_shared()
        lut_row = LUT + item.to(gl.int64) * n_sel
        if OVERLAP:
            acc, m_i, l_i, step, turn_phase = pipelined_loop(q, k_ring, v_ring, ready, empty, q_free, my_turn,
                                                              their_turn, lut_row, N, n_sel, qk_scale, step,
                                                              turn_phase, D, BLOCK_N, STAGES)
        else:
            acc, m_i, l_i, step, turn_phase = serial_loop(q, k_ring, v_ring, ready, empty, q_free, my_turn,
                                                           their_turn, lut_row, N, n_sel, qk_scale, step,
                                                           turn_phase, D, BLOCK_N, STAGES)
        if SAVE_LSE:
            gl.store(LSE + bh * N + rows, gl.convert_layout(m_i + gl.log2(l_i), O_ROW), mask=row_valid)
        o_s = acc / gl.expand_dims(gl.convert_layout(l_i, O_ROW), 1)
        mbarrier.wait(h_ready, lap & 1)
        o = warpgroup_mma(stage, h_rest, o_s * alpha)
        mbarrier.arrive(h_free)
        stage.store(o.to(q.dtype))
        fence_async_shared()
        _tma_store(o_desc, [b, h, tile * 128 + WG * 64, 0], tile4(stage, 64, D))  # clipped at N
        lap += 1
    tma.store_wait(0)
