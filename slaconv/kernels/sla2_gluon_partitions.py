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
LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def query_features(q_tile, PHI_Q, row_offsets, row_valid, HEDGEHOG: gl.constexpr, D: gl.constexpr,
                   LAYOUT: gl.constexpr):
    """phi(Q) of one warpgroup's 64 rows (fp32, ``LAYOUT``): softmax over the head dim of the 16-bit Q tile in
    shared memory, or with HEDGEHOG == 1 the rows the q pre-pass wrote to PHI_Q (``row_offsets`` = (batch *
    head) * N + row, (B*H, N, D) contiguous); rows past N read 0.  (HEDGEHOG == 2 is
    :func:`hedgehog_features`, from the weights in shared memory.)"""
    if HEDGEHOG == 1:
        channels = gl.arange(0, D, layout=gl.SliceLayout(0, LAYOUT))
        offsets = gl.expand_dims(row_offsets.to(gl.int64) * D, 1) + gl.expand_dims(channels, 0)
        valid = gl.expand_dims(row_valid, 1) & gl.expand_dims(channels < D, 0)
        return gl.load(PHI_Q + offsets, mask=valid, other=0.0).to(gl.float32)
    else:
        qf = q_tile.load(LAYOUT).to(gl.float32)
        e = gl.exp(qf - gl.expand_dims(gl.max(qf, axis=1), 1))
        return e / gl.expand_dims(gl.sum(e, axis=1), 1)


@gluon.jit
def hedgehog_features(q_tile, w_tile, dtype: gl.constexpr, D: gl.constexpr, LAYOUT: gl.constexpr):
    """The Hedgehog phi(Q) = [softmax(Q W), softmax(-Q W)] of one warpgroup's 64 rows from the 16-bit Q tile
    and this head's signed stack [W, -W] (D x D), both in shared memory: one wgmma gives both halves' logits,
    each half is normalised on its own.  Rounded to the input dtype as the q pre-pass stores it, so this and
    the pre-pass path agree (and with the backward, which recomputes the same 16-bit features)."""
    logits = warpgroup_mma(q_tile, w_tile, gl.zeros([64, D], gl.float32, LAYOUT), use_acc=False)
    upper = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, LAYOUT)) >= D // 2, 0)
    max_lo = gl.expand_dims(gl.max(gl.where(upper, float("-inf"), logits), axis=1), 1)
    max_hi = gl.expand_dims(gl.max(gl.where(upper, logits, float("-inf")), axis=1), 1)
    e = gl.exp(logits - gl.where(upper, max_hi, max_lo))
    sum_lo = gl.expand_dims(gl.sum(gl.where(upper, 0.0, e), axis=1), 1)
    sum_hi = gl.expand_dims(gl.sum(gl.where(upper, e, 0.0), axis=1), 1)
    return (e / gl.where(upper, sum_hi, sum_lo)).to(dtype).to(gl.float32)


@gluon.jit
def linear_tail_weights(phi_q, alpha, z_rest_ptr, has_lin, D: gl.constexpr, LAYOUT: gl.constexpr):
    """The linear branch's row weights for one warpgroup's 64 rows: with :func:`query_features` the one place
    that knows how the tail beyond the selected blocks is estimated (the epilogue then adds psi H_rest to
    alpha O_s in one MMA).

    ``phi_q`` is phi(Q) of the rows (fp32, ``LAYOUT``), ``z_rest_ptr`` the routing block's z_rest.  Returns
    psi = (1 - alpha) phi(Q) / den (fp32; the caller rounds it to 16 bits for the MMA, as
    ``fwd_sparse_kernel`` does) with den = phi(Q) z_rest + eps, and 1/den per row (0 when every block is
    selected: then the linear branch is exactly 0).  ``alpha`` = 0 leaves (1 - alpha) for the epilogue (alpha
    per row is known only after the loop)."""
    z_rest = gl.load(z_rest_ptr + gl.arange(0, D, layout=gl.SliceLayout(0, LAYOUT)))
    den = gl.sum(phi_q * gl.expand_dims(z_rest, 0), axis=1) + LINEAR_EPS
    # a select, not 0 / den: when every block is selected z_rest is rounding residue and den can land on 0
    inv_den = gl.where(has_lin != 0, 1.0 / den, 0.0)
    return phi_q * gl.expand_dims((1.0 - alpha) * inv_den, 1), inv_den


@gluon.jit
def row_mix_ratio(lse_sel, LSE_TAIL, alpha_logit, row_offsets, row_valid, has_lin, MIX_ROWS: gl.constexpr):
    """alpha per query row: sigmoid(LSE_sel - LSE_tail + alpha_logit), both log-sum-exps in log2 units and in
    the loop's frame (LSE_tail from the forward's tail launch), or with MIX_ROWS == 2 (``mixing:
    query-linear``) sigmoid of the row's whole logit, which LSE_TAIL then holds; 1 when every block is
    selected."""
    if MIX_ROWS == 2:
        logit = gl.load(LSE_TAIL + row_offsets, mask=row_valid, other=0.0)
    else:
        lse_tail = gl.load(LSE_TAIL + row_offsets, mask=row_valid, other=float("-inf"))
        logit = (lse_sel - lse_tail) * LN2 + alpha_logit
    ratio = 1.0 / (1.0 + gl.exp(-logit))
    lin = (has_lin != 0).to(gl.float32)
    return lin * ratio + (1.0 - lin)


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
def tile3(buf, ROWS: gl.constexpr, COLS: gl.constexpr):
    """A (ROWS, COLS) shared tile as the (1, ROWS, COLS) box of the 3-d (batch * head, ...) descriptors of the
    low-bit copies."""
    return buf.reshape([1, ROWS, COLS])


@gluon.jit
def producer(q_desc, q8_desc, k_desc, v_desc, h_desc, w_desc, q_tiles, q8_tiles, k_ring, v_ring, h_rest, ready,
             empty, q_ready, q_free, h_ready, h_free, LUT, n_items, nq, H, n_sel, lin_div,
             D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, QUANT: gl.constexpr,
             HEDGEHOG: gl.constexpr):
    """TMA loads, item after item: the tile's Q (and its INT8 copy when QUANT) once both consumers are past
    their last QK^T of the previous tile, its selected K and V blocks into the ring (one ring for all items,
    so the next tile's first blocks arrive while the consumers finish the current one), then its H_rest once
    the previous mix is done (item i's is row block i // lin_div: one per routing block or per (batch, head)).
    QUANT == 2 loads INT8 K - mean(K) and FP8 V^T (token-contiguous) blocks.

    HEDGEHOG == 2: the H_rest buffer first holds the head's Hedgehog weights for the consumers' phi(Q), two
    uses per item (h_ready and h_free complete twice, so the weights wait on phase 0 and H_rest on phase 1).
    The weights go in once the previous mix is done, after as many K/V blocks as the ring holds: those slots
    wait only on the previous item's loop, so the ring fills across the item boundary as without them."""
    step = 0
    lap = 0
    for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
        tile, b, h = work_item(item, nq, H)
        bh = item // nq
        mbarrier.wait(q_free, (lap & 1) ^ 1)
        if QUANT == 2:
            mbarrier.expect(q_ready, 2 * (q_desc.block_type.nbytes + q8_desc.block_type.nbytes))
        else:
            mbarrier.expect(q_ready, 2 * q_desc.block_type.nbytes)
        for half in gl.static_range(2):
            _tma_load(q_desc, [b, h, tile * 128 + half * 64, 0], q_ready, tile4(q_tiles.index(half), 64, D))
            if QUANT == 2:
                _tma_load(q8_desc, [bh, tile * 128 + half * 64, 0], q_ready, tile3(q8_tiles.index(half), 64, D))
        lut_row = LUT + item.to(gl.int64) * n_sel
        weights_after = gl.minimum(n_sel, STAGES) - 1
        for j in range(n_sel):
            slot = step % STAGES
            mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)
            block = gl.load(lut_row + j)
            mbarrier.expect(ready.index(slot), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            if QUANT == 2:
                _tma_load(k_desc, [bh, block * BLOCK_N, 0], ready.index(slot), tile3(k_ring.index(slot), BLOCK_N, D))
                _tma_load(v_desc, [bh, 0, block * BLOCK_N], ready.index(slot), tile3(v_ring.index(slot), D, BLOCK_N))
            else:
                _tma_load(k_desc, [b, h, block * BLOCK_N, 0], ready.index(slot), tile4(k_ring.index(slot), BLOCK_N, D))
                _tma_load(v_desc, [b, h, block * BLOCK_N, 0], ready.index(slot), tile4(v_ring.index(slot), BLOCK_N, D))
            step += 1
            if HEDGEHOG == 2:
                if j == weights_after:
                    mbarrier.wait(h_free, 1)  # the previous item's mix has read H_rest
                    mbarrier.expect(h_ready, w_desc.block_type.nbytes)
                    _tma_load(w_desc, [h * D, 0], h_ready, h_rest)
        if HEDGEHOG == 2:
            mbarrier.wait(h_free, 0)  # both consumers have their phi(Q)
        else:
            mbarrier.wait(h_free, (lap & 1) ^ 1)
        mbarrier.expect(h_ready, h_desc.block_type.nbytes)
        _tma_load(h_desc, [(item // lin_div) * D, 0], h_ready, h_rest)
        lap += 1


@gluon.jit
def masked_logits(s, block, cols, N, q_scale, k_scale_row, QUANT: gl.constexpr, BLOCK_N: gl.constexpr):
    """Logits of key block ``block`` in log2 units: S times qk_scale (``q_scale``), or for QUANT the INT32 S
    times the query block's and the key block's INT8 scales (qk_scale is inside the INT8 Q).  Keys past N
    (the ragged last block, zeros through TMA) -> -inf."""
    if QUANT == 2:
        s = s.to(gl.float32) * (q_scale * gl.load(k_scale_row + block))
    else:
        s = s * q_scale
    return gl.where(gl.expand_dims(cols < N - block * BLOCK_N, 0), s, float("-inf"))


@gluon.jit
def p_operand(p, p_tile, dtype: gl.constexpr, QUANT: gl.constexpr, P_LAYOUT: gl.constexpr):
    """P as the A operand of the PV wgmma: 16-bit registers, or for QUANT FP8 e4m3 of 448 P in the
    warpgroup's shared tile ``p_tile`` (the wait of an asynchronous wgmma cannot keep 8-bit registers alive;
    the tile is rewritten only after the PV that read it is waited for)."""
    if QUANT == 2:
        p_tile.store((p * 448.0).to(gl.float8e4nv))
        fence_async_shared()
        op = p_tile
    else:
        op = gl.convert_layout(p.to(dtype), P_LAYOUT)
    return op


@gluon.jit
def v_operand(v_slot, QUANT: gl.constexpr):
    """A V block as the B operand of the PV wgmma: (keys, D), or the FP8 V^T block (D, keys) transposed."""
    if QUANT == 2:
        v_slot = v_slot.permute((1, 0))
    return v_slot


@gluon.jit
def pv_and_release(p_op, v_slot, acc, empty_slot, QUANT: gl.constexpr):
    """acc + P V, waited for, then the slot released to the producer.  A register P is kept alive until the
    MMA is done; an FP8 P lives in shared memory instead."""
    acc = warpgroup_mma(p_op, v_operand(v_slot, QUANT), acc, is_async=True)
    if QUANT == 2:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    else:
        acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
    mbarrier.arrive(empty_slot)
    return acc


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
def serial_loop(q, p_tile, k_ring, v_ring, ready, empty, q_free, my_turn, their_turn, lut_row, k_scale_row, N, n_sel,
                q_scale, step, turn_phase, dtype: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr,
                STAGES: gl.constexpr, QUANT: gl.constexpr, S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr,
                P_LAYOUT: gl.constexpr):
    """The online softmax with every MMA waited for at once: QK^T(j), softmax(j), PV(j), in turn."""
    m_i = gl.full([64], float("-inf"), gl.float32, gl.SliceLayout(1, S_LAYOUT))
    l_i = gl.zeros([64], gl.float32, gl.SliceLayout(1, S_LAYOUT))
    acc = gl.zeros([64, D], gl.float32, O_LAYOUT)
    s_zero = gl.zeros([64, BLOCK_N], gl.int32 if QUANT == 2 else gl.float32, S_LAYOUT)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))
    for j in range(n_sel):
        slot = step % STAGES
        mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
        s = warpgroup_mma(q, k_ring.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        block = gl.load(lut_row + j)  # its latency hides behind the MMA
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        mbarrier.arrive(q_free, pred=j == n_sel - 1)
        s = masked_logits(s, block, cols, N, q_scale, k_scale_row, QUANT, BLOCK_N)
        p, m_i, l_i, rescale, turn_phase = softmax_step(s, m_i, l_i, my_turn, their_turn, turn_phase)
        acc = acc * gl.expand_dims(gl.convert_layout(rescale, gl.SliceLayout(1, O_LAYOUT)), 1)
        p_op = p_operand(p, p_tile, dtype, QUANT, P_LAYOUT)
        acc = pv_and_release(p_op, v_ring.index(slot), acc, empty.index(slot), QUANT)
        step += 1
    return acc, m_i, l_i, step, turn_phase


@gluon.jit
def pipelined_loop(q, p_tile, k_ring, v_ring, ready, empty, q_free, my_turn, their_turn, lut_row, k_scale_row, N, n_sel,
                   q_scale, step, turn_phase, dtype: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, QUANT: gl.constexpr, S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr,
                   P_LAYOUT: gl.constexpr):
    """The online softmax with QK^T(j+1) and PV(j) in flight while the softmax of block j+1 runs
    (FlashAttention-3's intra-warpgroup overlap): per step, issue QK^T(j+1) then PV(j), wait for the first,
    run the exponentials, wait for the second, rescale.  The accumulator absorbs PV(j) under the old row
    maximum before the rescale, so O_j = (O_{j-1} + P_j V_j) exp2(m_j - m_{j+1}) as in the serial loop."""
    s_zero = gl.zeros([64, BLOCK_N], gl.int32 if QUANT == 2 else gl.float32, S_LAYOUT)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))

    slot = step % STAGES
    mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
    s = warpgroup_mma(q, k_ring.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    block = gl.load(lut_row)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    mbarrier.arrive(q_free, pred=n_sel == 1)
    s = masked_logits(s, block, cols, N, q_scale, k_scale_row, QUANT, BLOCK_N)
    p, m_i, l_i, _, turn_phase = softmax_step(s, gl.full([64], float("-inf"), gl.float32, gl.SliceLayout(1, S_LAYOUT)),
                                              gl.zeros([64], gl.float32, gl.SliceLayout(1, S_LAYOUT)), my_turn,
                                              their_turn, turn_phase)
    p_op = p_operand(p, p_tile, dtype, QUANT, P_LAYOUT)
    acc = gl.zeros([64, D], gl.float32, O_LAYOUT)
    for j in range(1, n_sel):
        next_slot = (step + 1) % STAGES
        mbarrier.wait(ready.index(next_slot), ((step + 1) // STAGES) & 1)
        s = warpgroup_mma(q, k_ring.index(next_slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        acc = warpgroup_mma(p_op, v_operand(v_ring.index(slot), QUANT), acc, is_async=True)
        block = gl.load(lut_row + j)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))  # groups retire in order: QK^T(j) is done
        mbarrier.arrive(q_free, pred=j == n_sel - 1)
        s = masked_logits(s, block, cols, N, q_scale, k_scale_row, QUANT, BLOCK_N)
        p, m_i, l_i, rescale, turn_phase = softmax_step(s, m_i, l_i, my_turn, their_turn, turn_phase)
        if QUANT == 2:  # P is in shared memory: nothing in registers to keep alive
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        else:
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
        mbarrier.arrive(empty.index(slot))
        acc = acc * gl.expand_dims(gl.convert_layout(rescale, gl.SliceLayout(1, O_LAYOUT)), 1)
        p_op = p_operand(p, p_tile, dtype, QUANT, P_LAYOUT)
        step += 1
        slot = next_slot
    acc = pv_and_release(p_op, v_ring.index(slot), acc, empty.index(slot), QUANT)
    return acc, m_i, l_i, step + 1, turn_phase


@gluon.jit
def consumer(q_tiles, q8_tiles, p_tiles, staging, k_ring, v_ring, h_rest, ready, empty, q_ready, q_free, h_ready, h_free,
             my_turn, their_turn, o_desc, LUT, Z_REST, ALPHA, LSE, INV_DEN, Q_SCALE, K_SCALE, V_ABSMAX, K_SUM,
             PHI_Q, LSE_TAIL, ALPHA_ROWS, n_items, nq, nk, H, N, n_sel, qk_scale, inv_n, has_lin, lin_div,
             WG: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
             SAVE_LSE: gl.constexpr, OVERLAP: gl.constexpr, QUANT: gl.constexpr, HEDGEHOG: gl.constexpr,
             MIX_ROWS: gl.constexpr, S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr, P_LAYOUT: gl.constexpr,
             MIX_LAYOUT: gl.constexpr):
    """One warpgroup's 64 query rows of each item: psi from Q first (staged in shared memory for the mix, so
    the Q buffer is free for the next tile as soon as the last QK^T is done), the online softmax over the
    ring, then the mix O = alpha O_s + psi H_rest and the TMA store of O from the same staging buffer.
    QUANT == 2: QK^T in INT8 on the INT8 Q, PV in FP8; O_s is scaled back by V's per-channel scale and the
    LSE is corrected by q . mean(K) qk_scale (the INT8 logits use K - mean(K)).  HEDGEHOG: phi(Q) from the q
    pre-pass (PHI_Q) instead of softmax over the head dim, or with HEDGEHOG == 2 from Q and the head's weights
    (the producer's first load into the H_rest buffer).  MIX_ROWS: ALPHA holds the head's logit and alpha
    is one per row from the loop's log-sum-exp and LSE_TAIL (:func:`row_mix_ratio`), stored in ALPHA_ROWS
    when SAVE_LSE; psi is staged without its (1 - alpha) before the loop and scaled by it after."""
    ROW: gl.constexpr = gl.SliceLayout(1, MIX_LAYOUT)
    CHANNELS: gl.constexpr = gl.SliceLayout(0, MIX_LAYOUT)
    q = q_tiles.index(WG)
    q_mma = q8_tiles.index(WG)
    p_tile = p_tiles.index(WG)
    stage = staging.index(WG)
    dtype: gl.constexpr = q_tiles.dtype
    step = 0
    lap = 0
    turn_phase = 0
    for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
        tile, b, h = work_item(item, nq, H)
        bh = item.to(gl.int64) // nq
        rows = tile * 128 + WG * 64 + gl.arange(0, 64, layout=ROW)
        row_valid = rows < N
        alpha = gl.load(ALPHA + h)  # with MIX_ROWS the head's logit
        if MIX_ROWS:
            psi_alpha = 0.0 * alpha
        else:
            psi_alpha = alpha
        mbarrier.wait(q_ready, lap & 1)
        if HEDGEHOG == 2:
            mbarrier.wait(h_ready, 0)  # the weights, in the H_rest buffer
            phi_q = hedgehog_features(q, h_rest, dtype, D, MIX_LAYOUT)
            mbarrier.arrive(h_free)
        else:
            phi_q = query_features(q, PHI_Q, bh * N + rows, row_valid, HEDGEHOG, D, MIX_LAYOUT)
        psi, inv_den = linear_tail_weights(phi_q, psi_alpha, Z_REST + (item // lin_div).to(gl.int64) * D, has_lin,
                                           D, MIX_LAYOUT)
        gl.store(INV_DEN + bh * N + rows, inv_den, mask=row_valid)
        tma.store_wait(0)  # the previous item's O has left the staging buffer
        stage.store(psi.to(dtype))
        fence_async_shared()
        if QUANT == 2:
            q_scale = gl.load(Q_SCALE + item)
            if SAVE_LSE:  # Q read again rather than held through the psi registers
                k_mean = gl.load(K_SUM + bh * D + gl.arange(0, D, layout=CHANNELS)) * inv_n
                lse_shift = gl.sum(q.load(MIX_LAYOUT).to(gl.float32) * gl.expand_dims(k_mean, 0), axis=1) * qk_scale
        else:
            q_scale = qk_scale
        lut_row = LUT + item.to(gl.int64) * n_sel
        k_scale_row = K_SCALE + bh * nk
        if OVERLAP:
            acc, m_i, l_i, step, turn_phase = pipelined_loop(q_mma, p_tile, k_ring, v_ring, ready, empty, q_free, my_turn,
                                                             their_turn, lut_row, k_scale_row, N, n_sel, q_scale,
                                                             step, turn_phase, dtype, D, BLOCK_N, STAGES, QUANT,
                                                             S_LAYOUT, O_LAYOUT, P_LAYOUT)
        else:
            acc, m_i, l_i, step, turn_phase = serial_loop(q_mma, p_tile, k_ring, v_ring, ready, empty, q_free, my_turn,
                                                          their_turn, lut_row, k_scale_row, N, n_sel, q_scale,
                                                          step, turn_phase, dtype, D, BLOCK_N, STAGES, QUANT,
                                                          S_LAYOUT, O_LAYOUT, P_LAYOUT)
        lse_loop = gl.convert_layout(m_i + gl.log2(l_i), ROW)  # the loop's frame (K - mean(K) for INT8)
        if SAVE_LSE:
            if QUANT == 2:
                gl.store(LSE + bh * N + rows, lse_loop + lse_shift, mask=row_valid)
            else:
                gl.store(LSE + bh * N + rows, lse_loop, mask=row_valid)
        o_s = gl.convert_layout(acc, MIX_LAYOUT) / gl.expand_dims(gl.convert_layout(l_i, ROW), 1)
        if QUANT == 2:
            v_scale = gl.maximum(gl.load(V_ABSMAX + bh * D + gl.arange(0, D, layout=CHANNELS)), 1e-8) / 448.0
            o_s = o_s * gl.expand_dims(v_scale / 448.0, 0)
        if MIX_ROWS:
            alpha_rows = row_mix_ratio(lse_loop, LSE_TAIL, alpha, bh * N + rows, row_valid, has_lin, MIX_ROWS)
            if SAVE_LSE:
                gl.store(ALPHA_ROWS + bh * N + rows, alpha_rows, mask=row_valid)
            # each thread rescales the psi elements it wrote (same layout), so no barrier is needed first
            psi = stage.load(MIX_LAYOUT).to(gl.float32) * gl.expand_dims(1.0 - alpha_rows, 1)
            stage.store(psi.to(dtype))
            fence_async_shared()
            o_sparse = o_s * gl.expand_dims(alpha_rows, 1)
        else:
            o_sparse = o_s * alpha
        if HEDGEHOG == 2:
            mbarrier.wait(h_ready, 1)
        else:
            mbarrier.wait(h_ready, lap & 1)
        o = warpgroup_mma(stage, h_rest, o_sparse)
        mbarrier.arrive(h_free)
        stage.store(o.to(dtype))
        fence_async_shared()
        _tma_store(o_desc, [b, h, tile * 128 + WG * 64, 0], tile4(stage, 64, D))  # clipped at N
        lap += 1
    tma.store_wait(0)
