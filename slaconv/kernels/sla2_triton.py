"""SLA2 attention on Triton: buffers, launches, custom ops and autograd (design: README.md beside it).

Entry point: :func:`sla2_attention_triton` (called by :mod:`slaconv.kernels.ops`).  The work is
registered as two ``torch.library`` custom ops, ``slaconv::sla2_fwd`` and ``slaconv::sla2_bwd``, with
fake implementations and an autograd formula, so ``torch.compile`` traces a module that calls it
without a graph break.  Custom ops take plain values only: their settings are the fields of
:class:`~slaconv.kernels.spec.AttentionSpec`, the layout and :meth:`LaunchConfig.as_ints`.

Extra memory (beside the output): phi(K) as a temporary (B*H*N*D, input dtype), the linear branch's
state per query block handed from the linear launch to the sparse launch (H_rest and z_rest:
B*H*(N/b_q)*D^2, O_l's size at b_q = D, half of it at D = 64 and b_q = 128, twice at D = 128 and
b_q = 64), z per key block (B*H*nk*D fp32), the LUT (B*H*nq*n_sel int32), D x D and D totals per (b, h)
(and per pre-pass split), and for the low-bit modes INT8/FP8 copies of Q, K, V.  Saved for the
backward: O (which the next layer keeps anyway), the LUT, the LSE and 1/den (two fp32 per row) and the
D x D totals; the backward recomputes phi(Q), phi(K) and the linear numerator instead of saving O_s,
O_l, phi(Q), phi(K) (4 x B*H*N*D: 0.4 GB per Wan2.1-1.3B layer at 480p), and builds the inverted index
(B*H*nt*n_sel int32).  Nothing O(N^2), no per-key-block D x D state.  Hedgehog features add phi(Q) as a
forward temporary and, in the backward, the gradients of the stacked logits of Q and K (B*H*N*D each, input
dtype); alpha per query adds LSE_tail, the saved alpha per row (one fp32 per row each) and the selection
table (B*H*nq*nk int8).

The kernels live in ``sla2_triton_forward.py`` and ``sla2_triton_backward.py``, their shared device
functions in ``sla2_triton_common.py``; this module holds the launches and the autograd function.
"""

from __future__ import annotations

import math
import os

import torch
import triton

from ..config import KERNEL_HEAD_DIMS, ROW_WEIGHT_MIXINGS
from . import reference
from . import sla2_gluon as gluon_kernels
from . import sla2_gluon_backward as gluon_backward
from . import sla2_triton_backward as backward_kernels
from . import sla2_triton_forward as forward_kernels
from . import sla2_triton_linear as linear
from . import sla2_triton_ws as ws_kernels
from .launch import DEFAULT_LAUNCH, LaunchConfig
from .spec import AttentionSpec, check_layout

__all__ = ["sla2_attention_triton", "router_lut", "inverted_index", "forward", "backward", "sla2_fwd", "sla2_bwd"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_QUANT_ID = {"none": 0, "int8": 1, "int8-fp8": 2}  # the kernels' QUANT constexpr


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _warps_stages(num_warps: int, num_stages: int) -> dict:
    """Launch options; the interpreter takes none."""
    return {} if _interpreting() else {"num_warps": num_warps, "num_stages": num_stages}


def _row_pass() -> dict:
    """One tile per program, no loop: the feature and per-row passes."""
    return _warps_stages(4, 1)


def _reduction_pass(head_dim: int) -> dict:
    """The split-K D x D reductions: spread the fp32 accumulator over 8 warps at D = 128."""
    return _warps_stages(4 if head_dim == 64 else 8, 2)


def _dims(x: torch.Tensor, layout: str):
    """(B, H, N, D) and the (batch, head, token) strides of a tensor in ``layout``."""
    if layout == "bnhd":
        b, n, h, d = x.shape
        return (b, h, n, d), (x.stride(0), x.stride(2), x.stride(1))
    b, h, n, d = x.shape
    return (b, h, n, d), (x.stride(0), x.stride(1), x.stride(2))


def _as_bhnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A (B, H, N, D) view of a tensor in ``layout``."""
    return x.transpose(1, 2) if layout == "bnhd" else x


def _unit_head_stride(x: torch.Tensor) -> torch.Tensor:
    # the kernels need a unit head-dim stride; every layout diffusers hands over has one
    return x if x.stride(-1) == 1 else x.contiguous()


def _split_count(bh: int, n_blocks: int, target: int = 264) -> int:
    """Programs per (b, h) for the split-K pre-passes: about ``target`` programs in all (enough to fill the
    GPU), at most one per block."""
    target = 16 if _interpreting() else target
    return max(1, min(n_blocks, -(-target // bh)))


KEY_PASS_WARPS = {False: 16, True: 8}
"""Warps of ``key_pass`` by feature map (Hedgehog or not), from sm_90 compiles at D = 128 (Triton 3.6 / 3.9):
softmax features, 16 warps in 117 / 100 registers (8 warps: 178 / 179, the whole SM's registers for half the
warps); Hedgehog features, whose logits MMA adds a second (b_k x D) fp32 tile, 8 warps in 219 / 220 registers
without spills (16 warps spill with Triton 3.9).  Not yet timed on a GPU."""


def _key_pass_programs(device: torch.device) -> int:
    """``key_pass`` programs in all: one per SM (each holds a whole SM's registers), so one wave.  Off a GPU
    (the interpreter, or the offline compile report on CPU tensors): 16, and an H100's 132 SMs."""
    if _interpreting():
        return 16
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _check_tensors(q, k, v, layout: str) -> None:
    check_layout(layout)
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be 4-D with equal shapes, "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] not in KERNEL_HEAD_DIMS:
        raise ValueError(f"the SLA2 Triton kernels take head dims {KERNEL_HEAD_DIMS}, got head dim {q.shape[-1]}")
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the SLA2 Triton kernels take dtypes {KERNEL_DTYPES}, got {q.dtype}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _mix_ratio(alpha_logit: torch.Tensor, n_sel: int, nk: int) -> torch.Tensor:
    """alpha = sigmoid(alpha_logit) per head, or 1 when every row selects every key block: then the linear
    branch has nothing to cover and the output is O_s alone (with alpha 1 the backward's alpha gradient,
    (1 - alpha) rowsum(dO * O) - u, is exactly zero as well)."""
    if n_sel == nk:
        return torch.ones_like(alpha_logit, dtype=torch.float32)
    return torch.sigmoid(alpha_logit.detach().float()).contiguous()


# --------------------------------------------------------------------------------------------------
# router, LUT and the inverted index (small tensors)
# --------------------------------------------------------------------------------------------------


ROUTER_ROWS = 16  # query (or key) blocks per router program: the smallest MMA tile
ROUTER_KEYS = 64  # key blocks per step of the router's score GEMM
ROUTER_CHUNK = 16  # the router projections' steps over the head dim
ROUTER_SELECT_KEYS = 8192  # integer keys the top-k holds at once (32 per thread at 8 warps)


def router_lut(q_mean, k_mean, k_sum, n_tokens, router_q, router_k, n_sel, always_kept=(0, 0)):
    """Pooled router -> sorted int32 LUT (B, H, nq, n_sel) of the key blocks each query block attends to.

    ``q_mean`` (B, H, nq, D) and ``k_mean`` (B, H, nk, D) are the block means in fp32, ``k_sum`` (B, H, D) the
    token sums of K over ``n_tokens`` tokens: the router removes the token mean from the key side.  The
    projections and scores are fp32-accurate (3-pass TF32 MMAs) whatever the caller's autocast: the ranking
    needs it.  The key blocks of the ``always_kept`` range ``[start, end)`` are in every row; the other
    ``n_sel - (end - start)`` are the best-scoring.  Two launches: the key projections, then the query
    projections, scores and top-k of ``ROUTER_ROWS`` query blocks per program."""
    *lead, nq, d = q_mean.shape
    nk = k_mean.shape[-2]
    bh = q_mean[..., 0, 0].numel()
    heads = router_q.shape[0]
    dev = q_mean.device
    k_proj = torch.empty(bh, nk, d, device=dev, dtype=torch.float32)
    router_q, router_k = router_q.detach().contiguous(), router_k.detach().contiguous()
    forward_kernels.router_key_proj[(_cdiv(nk, ROUTER_ROWS), bh)](
        k_mean.contiguous(), k_sum.contiguous(), router_k, k_proj, nk, heads, 1.0 / n_tokens,
        D=d, ROWS=ROUTER_ROWS, CHUNK=ROUTER_CHUNK, **({} if _interpreting() else {"num_warps": 4}))
    nk_p = max(triton.next_power_of_2(nk), ROUTER_KEYS)
    programs = _cdiv(nq, ROUTER_ROWS)
    scores = torch.empty(bh, programs * ROUTER_ROWS, nk, device=dev, dtype=torch.float32)  # scratch
    lut = torch.empty(*lead, nq, n_sel, device=dev, dtype=torch.int32)
    forward_kernels.router_topk[(programs, bh)](
        q_mean.contiguous(), router_q, k_proj, scores, lut, nq, nk, n_sel, *always_kept, heads,
        D=d, ROWS=ROUTER_ROWS, NK_P=nk_p, KEYS=ROUTER_KEYS, CHUNK=ROUTER_CHUNK,
        SELECT_ROWS=max(1, min(ROUTER_ROWS, ROUTER_SELECT_KEYS // nk_p)),
        **({} if _interpreting() else {"num_warps": 8, "num_stages": 2}))
    return lut


def inverted_index(lut: torch.Tensor, n: int, block_q: int, nk: int, tile_m: int):
    """Key block -> query tiles (of ``tile_m`` rows) that selected it, CSR per (b, h).

    Returns ``offsets`` (B*H*nk + 1,) int32 into ``tiles`` (B*H*nt*n_sel,) int32, grouped by
    (b*H + h)*nk + key block.  Built with sort/scatter_add (no host sync), no dense map.
    """
    b, h, nq, n_sel = lut.shape
    n_tiles = _cdiv(n, tile_m)
    dev = lut.device
    tile_block = (torch.arange(n_tiles, device=dev) * tile_m) // block_q  # routing block of each tile
    keys = lut.view(b * h, nq, n_sel).long()[:, tile_block, :]  # (BH, nt, n_sel)
    bh_offset = (torch.arange(b * h, device=dev) * nk).view(-1, 1, 1)
    flat_key = (keys + bh_offset).reshape(-1)
    tile_id = torch.arange(n_tiles, device=dev).view(1, n_tiles, 1).expand_as(keys).reshape(-1)
    order = torch.sort(flat_key * n_tiles + tile_id).values
    tiles = (order % n_tiles).to(torch.int32)
    # scatter_add, not bincount: bincount reads the max key back to the host (a device sync per backward
    # call, which drains the launch queue of every layer in eager training)
    counts = torch.zeros(b * h * nk, dtype=torch.int64, device=dev).scatter_add_(0, flat_key, torch.ones_like(flat_key))
    offsets = torch.zeros(b * h * nk + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets.to(torch.int32), tiles


# --------------------------------------------------------------------------------------------------
# forward / backward drivers
# --------------------------------------------------------------------------------------------------


def _key_pass(k, v, k_strides, v_strides, feature_k, N: int, H: int, nk: int, block_k: int, need_v_absmax: bool):
    """The forward's key statistics in one launch (``key_pass``): the key blocks' means (B*H, nk, D), H_all
    (B*H, D, D), the token sums of K and z_all (B*H, D each), all fp32, and max|V| per channel (B*H, D) if
    ``need_v_absmax`` (else a stand-in that is not read)."""
    BH, D, dev, f32 = k.shape[0] * H, k.shape[-1], k.device, torch.float32
    n_splits = _split_count(BH, nk, target=_key_pass_programs(dev))
    k_mean = torch.empty(BH, nk, D, device=dev, dtype=f32)
    h_partial = torch.empty(BH, n_splits, D, D, device=dev, dtype=f32)
    sums = torch.empty(2, BH, n_splits, D, device=dev, dtype=f32)  # K and phi(K): one reduction for both
    v_absmax_partial = torch.empty(BH, n_splits, D, device=dev, dtype=f32) if need_v_absmax else sums[1]
    forward_kernels.key_pass[(n_splits, BH)](
        k, v, k_mean, h_partial, sums[0], sums[1], v_absmax_partial, k_mean if feature_k is None else feature_k,
        *k_strides, *v_strides, N, H, nk, n_splits,
        D=D, BLOCK_N=block_k, NEED_V_ABSMAX=need_v_absmax, HEDGEHOG=feature_k is not None,
        **_warps_stages(KEY_PASS_WARPS[feature_k is not None], 2),
    )
    k_sum, z_all = sums.sum(dim=2)
    v_absmax = v_absmax_partial.amax(dim=1) if need_v_absmax else k_sum
    return k_mean, h_partial.sum(dim=1), k_sum, z_all, v_absmax


def forward(q, k, v, router_q, router_k, alpha_logit, spec: AttentionSpec, layout: str, save: bool,
            launch: LaunchConfig, feature_q=None, feature_k=None, mixing: str = "head",
            linear_keys: str = "unselected", alpha_weight=None):
    """Every launch of one forward: returns (O, LUT, LSE, 1/den, H_all, z_all, alpha per row).

    ``save`` writes the LSE (and with alpha per query row, alpha per row) the backward needs; otherwise they
    come back with 0 columns.  ``feature_q``, ``feature_k``: the Hedgehog signed stacks (H, D, D)
    (:func:`sla2_triton_linear.signed_weights`), both or neither (softmax features).  ``linear_keys="all"``:
    the linear branch over every key block, from H_all and z_all (no linear launch).  ``mixing="query-linear"``
    takes ``alpha_weight`` (H, D): the Q pre-pass forms each row's whole alpha logit q . w_h / sqrt(D) + a_h
    (no tail launch); ``mixing="query-block"`` too, and the tail log-sum-exp is pooled per query block from
    the block means the router already has (no tail launch either)."""
    _check_tensors(q, k, v, layout)
    linear.check_mixing(mixing)
    linear.check_linear_keys(linear_keys)
    hedgehog, mix_rows = feature_q is not None, mixing in ("query", "query-linear", "query-block")
    if (mixing in ROW_WEIGHT_MIXINGS) != (alpha_weight is not None):
        raise ValueError(f"alpha_weight goes with mixing {' or '.join(map(repr, ROW_WEIGHT_MIXINGS))}, and only "
                         "with them")
    if (feature_k is not None) != hedgehog:
        raise ValueError("feature_q and feature_k must be given together")
    lin_per_head = linear_keys == "all"
    if (hedgehog or mix_rows or lin_per_head) and launch.sparse_ws:
        raise ValueError("the warp-specialized sparse launch computes softmax features, alpha per head and the "
                         "linear branch over the unselected blocks only")
    if launch.sparse_ws:
        ws_kernels.check_supported(q.dtype, spec.quant)
    q, k, v = _unit_head_stride(q), _unit_head_stride(k), _unit_head_stride(v)
    if launch.sparse_gluon == 1:
        gluon_kernels.check_supported(q.device, q.dtype, q.shape[-1], spec.block_q, spec.block_k, spec.quant,
                                      (q, k, v))
    # sparse_gluon 2: the Gluon launch wherever it applies, the linear-branch options included
    use_gluon = launch.sparse_gluon == 1 or (
        launch.sparse_gluon == 2 and not launch.sparse_ws
        and gluon_kernels.applies(q.device, q.dtype, q.shape[-1], spec.block_q, spec.block_k, spec.quant,
                                  (q, k, v)))
    (B, H, N, D), q_strides = _dims(q, layout)
    _, k_strides = _dims(k, layout)
    _, v_strides = _dims(v, layout)
    dev, f32, BH = q.device, torch.float32, B * H
    quant = _QUANT_ID[spec.quant]
    tile_m = min(launch.tile_m_fwd, spec.block_q)
    nq, nk, n_tiles = _cdiv(N, spec.block_q), _cdiv(N, spec.block_k), _cdiv(N, tile_m)
    n_sel = spec.selected_blocks(nk)
    qk_scale = reference.LOG2E / math.sqrt(D)
    npad = nk * spec.block_k
    fp8_emulate = _interpreting()

    if lin_per_head and launch.key_pass:
        # 1 + 2 in one pass: the branch over every key block needs phi(K) only inside H_all and z_all
        k_mean, h_all, k_sum, z_all, v_absmax = _key_pass(k, v, k_strides, v_strides, feature_k, N, H, nk, spec.block_k,
                                                          need_v_absmax=quant == 2)
    else:
        # 1. per key block: mean and sum of K, -phi(K), z = column sums of phi(K), max|V| (FP8 scale)
        k_mean = torch.empty(BH, nk, D, device=dev, dtype=f32)
        block_sums = torch.empty(2, BH, nk, D, device=dev, dtype=f32)  # K sums and z: one reduction for both
        k_block_sum, z_block = block_sums[0], block_sums[1]
        v_absmax_block = torch.empty(BH, nk, D, device=dev, dtype=f32) if quant == 2 else z_block
        neg_phi_k = torch.empty(BH, N, D, device=dev, dtype=q.dtype)
        forward_kernels.k_feats[(nk, BH)](
            k, v, k_mean, k_block_sum, z_block, v_absmax_block, neg_phi_k, feature_k if hedgehog else k_mean,
            *k_strides, *v_strides, N, H, nk,
            D=D, BLOCK_N=spec.block_k, NEED_V_ABSMAX=quant == 2, NEGATE_PHI=True, HEDGEHOG=hedgehog, **_row_pass(),
        )
        # 2. H_all = sum phi(K)^T V as a split-K GEMM; the totals over key blocks
        n_splits = _split_count(BH, nk)
        h_partial = torch.empty(BH, n_splits, D, D, device=dev, dtype=f32)
        forward_kernels.kv_outer[(n_splits, BH)](neg_phi_k, v, h_partial, *v_strides, N, H, nk, n_splits,
                                                 D=D, BLOCK_N=spec.block_k, **_reduction_pass(D))
        h_all = h_partial.sum(dim=1)
        k_sum, z_all = block_sums.sum(dim=2)
        v_absmax = v_absmax_block.amax(dim=1) if quant == 2 else k_sum  # k_sum: a stand-in, not read
    # 3. per query block: mean of Q (router), INT8 Q, Hedgehog features of Q
    q_mean = torch.empty(BH, nq, D, device=dev, dtype=f32)
    q_int8 = torch.empty(BH, N, D, device=dev, dtype=torch.int8) if quant else q_mean
    q_scale = torch.empty(BH, nq, device=dev, dtype=f32) if quant else q_mean
    # (the Gluon launch may compute phi(Q) itself from the weights)
    phi_q_prepass = hedgehog and not (use_gluon and launch.gluon_query_features)
    phi_q = torch.empty(BH, N, D, device=dev, dtype=q.dtype) if phi_q_prepass else q_mean
    # query-linear: each row's alpha logit, formed where Q is read anyway (the kernels read it where they
    # would read LSE_tail); query-block: the row's q . w term alone (the kernels add alpha_logit themselves),
    # in the low-bit frame with q . mean(K) added, which moves the block estimate into the frame of LSE_sel
    row_terms = mixing in ROW_WEIGHT_MIXINGS
    if row_terms:
        row_weights = (alpha_weight.detach().float() / math.sqrt(D)).repeat(B, 1)
        if mixing == "query-block" and quant:
            row_weights = row_weights + k_sum / (N * math.sqrt(D))
        row_weights = row_weights.contiguous()
        row_bias = (alpha_logit.detach().float() if mixing == "query-linear"
                    else torch.zeros(H, device=dev, dtype=f32)).contiguous()
        row_logits = torch.empty(BH, N, device=dev, dtype=f32)
    else:
        row_weights = row_bias = row_logits = q_mean  # not read
    forward_kernels.q_prepass[(nq, BH)](q, q_mean, q_int8, q_scale, feature_q if phi_q_prepass else q_mean, phi_q,
                                        row_weights, row_bias, row_logits, *q_strides, N, H, nq, qk_scale,
                                        D=D, BLOCK_Q=spec.block_q, QUANT=quant, HEDGEHOG=phi_q_prepass,
                                        ROW_TERMS=row_terms)
    # 4. router -> LUT of the n_sel key blocks of every query block
    lut = router_lut(q_mean.view(B, H, nq, D), k_mean.view(B, H, nk, D), k_sum.view(B, H, D), N,
                     router_q, router_k, n_sel, spec.always_kept)
    # 5. low-bit copies: INT8 of the smoothed K, FP8 of V (token-contiguous)
    k_int8 = torch.empty(BH, N, D, device=dev, dtype=torch.int8) if quant else k_sum
    k_scale = torch.empty(BH, nk, device=dev, dtype=f32) if quant else k_sum
    v_fp8 = torch.empty(BH, D, npad, device=dev, dtype=torch.float8_e4m3fn) if quant == 2 else k_sum
    if quant:
        forward_kernels.kv_quant[(nk, BH)](
            k, v, k_sum, v_absmax, k_int8, k_scale, v_fp8, *k_strides, *v_strides, N, H, nk, npad, 1.0 / N,
            D=D, BLOCK_N=spec.block_k, QUANT=quant, FP8_EMULATE=fp8_emulate,
        )
    # 6. linear launch: H_rest and z_rest per query block (over every key block: H_all and z_all per head)
    if lin_per_head:
        h_rest, z_rest = h_all.to(q.dtype), z_all
    else:
        h_rest = torch.empty(BH, nq, D, D, device=dev, dtype=q.dtype)
        z_rest = torch.empty(BH, nq, D, device=dev, dtype=f32)
        forward_kernels.fwd_lin_kernel[(nq, BH)](
            v, neg_phi_k, z_block, lut, h_all, z_all, h_rest, z_rest, *v_strides, N, H, n_sel, nq, nk,
            D=D, BLOCK_N=spec.block_k, **_warps_stages(launch.lin_warps, launch.lin_stages),
        )
    # 7. sparse launch and the epilogue that mixes in the linear branch (per query: from the mass estimate)
    if mix_rows:
        if mixing == "query-linear":
            lse_tail = row_logits
        elif mixing == "query-block":  # LSE_pool - q . w / sqrt(D) in log2 units: the kernels' sigmoid adds it
            lse_tail = linear.block_tail_lse(q_mean, k_mean, lut, row_logits, N, spec.block_q, spec.block_k, qk_scale,
                                             one_launch=bool(launch.block_tail_launch))
        else:
            lse_tail = linear.tail_lse(q, q_strides, k_mean, k_sum, lut, N, H, spec.block_q, spec.block_k,
                                       qk_scale, tile_m, shifted=quant > 0)
        alpha = alpha_logit.detach().float().contiguous()  # query: the kernel adds each row's log mass ratio
    else:
        lse_tail = k_mean  # not read
        alpha = _mix_ratio(alpha_logit, n_sel, nk)
    alpha_rows = torch.empty(BH, N if save and mix_rows else 0, device=dev, dtype=f32)
    o = torch.empty(q.shape, device=dev, dtype=q.dtype)
    _, o_strides = _dims(o, layout)
    inv_den = torch.empty(BH, N, device=dev, dtype=f32)
    # the backward needs only the LSE beside O, 1/den and the totals (inference: not even the LSE)
    lse = torch.empty(BH, N if save else 0, device=dev, dtype=f32)
    if launch.sparse_ws:
        ws_kernels.launch_sparse_ws(
            (n_tiles, BH), q, k, v, lut, alpha, h_rest, z_rest, o, lse if save else inv_den, inv_den,
            (*q_strides, *k_strides, *v_strides, *o_strides), N, H, n_sel, nq, spec.block_q, qk_scale,
            int(n_sel < nk), D=D, BLOCK_M=tile_m, BLOCK_N=spec.block_k, SAVE_LSE=save, row_launch=_row_pass(),
            loop_launch=_warps_stages(ws_kernels.WS_WARPS, launch.num_stages),
        )
        return o, lut, lse, inv_den, h_all, z_all, alpha_rows
    if use_gluon:
        gluon_kernels.launch_sparse_gluon(
            (n_tiles, BH), q, k, v, lut, alpha, h_rest, z_rest, o, lse if save else inv_den, inv_den,
            (q_int8, q_scale, k_int8, k_scale, v_fp8, v_absmax, k_sum),
            (*q_strides, *k_strides, *v_strides, *o_strides), N, H, n_sel, nq, nk, qk_scale, int(n_sel < nk),
            D=D, BLOCK_N=spec.block_k, SAVE_LSE=save, quant=spec.quant, phi_q=phi_q if phi_q_prepass else None,
            query_weights=feature_q if hedgehog and not phi_q_prepass else None,
            lse_tail=lse_tail if mixing in ("query", "query-block") else None,
            row_logits=lse_tail if mixing == "query-linear" else None,
            alpha_rows=alpha_rows if alpha_rows.numel() else None,
            lin_per_head=lin_per_head,
        )
        return o, lut, lse, inv_den, h_all, z_all, alpha_rows
    forward_kernels.fwd_sparse_kernel[(n_tiles, BH)](
        q, k, v, q_int8, q_scale, k_int8, k_scale, v_fp8, v_absmax, k_sum, lut, alpha, h_rest, z_rest,
        o, lse if save else inv_den, inv_den,  # inv_den stands in for an LSE that is not written
        phi_q, lse_tail, alpha_rows if alpha_rows.numel() else inv_den,  # as for the LSE: no empty buffers
        *q_strides, *k_strides, *v_strides, *o_strides,
        N, H, n_sel, nq, nk, spec.block_q, qk_scale, 1.0 / N, npad, int(n_sel < nk),
        D=D, BLOCK_M=tile_m, BLOCK_N=spec.block_k, QUANT=quant, FP8_EMULATE=fp8_emulate, SAVE_LSE=save,
        HEDGEHOG=hedgehog, MIX_ROWS=2 if mixing == "query-linear" else int(mix_rows), LIN_PER_HEAD=lin_per_head,
        **_warps_stages(launch.num_warps, launch.num_stages),
    )
    return o, lut, lse, inv_den, h_all, z_all, alpha_rows


def backward(do, q, k, v, alpha_logit, lut, o, lse, inv_den, h_all, z_all, block_q: int, block_k: int,
             layout: str, launch: LaunchConfig, feature_q=None, feature_k=None, alpha_rows=None,
             linear_keys: str = "unselected", row_grads: bool = False):
    """Every launch of one backward: returns (dQ, dK, dV, d alpha_logit, d feature_q, d feature_k), 16-bit
    math on the original Q, K, V.  ``feature_q``, ``feature_k``: the forward's Hedgehog signed stacks or
    None (their gradients are then None); ``alpha_rows``: the forward's alpha per row with
    a per-row mixing, else None or empty.  ``row_grads`` (``"query-linear"``, ``"query-block"``): the
    fourth result is instead the gradient of each row's alpha logit, (B*H, N) fp32.  ``linear_keys="all"``:
    the forward's linear branch covered every key block, so the linear launches subtract nothing (no selected
    blocks, an empty inverted index)."""
    do, q, k, v, o = (_unit_head_stride(t) for t in (do, q, k, v, o))
    (B, H, N, D), q_strides = _dims(q, layout)
    _, k_strides = _dims(k, layout)
    _, v_strides = _dims(v, layout)
    _, do_strides = _dims(do, layout)
    _, o_strides = _dims(o, layout)
    dev, f32, BH = q.device, torch.float32, B * H
    tile_m = min(launch.tile_m_bwd, block_q)
    lin_tile_m = min(launch.tile_m_fwd, block_q)
    nq, nk, n_tiles = _cdiv(N, block_q), _cdiv(N, block_k), _cdiv(N, tile_m)
    n_sel = lut.shape[-1]
    sm_scale = 1.0 / math.sqrt(D)
    qk_scale = sm_scale * reference.LOG2E
    hedgehog = feature_q is not None
    mix_rows = alpha_rows is not None and alpha_rows.numel() > 0
    alpha = alpha_rows if mix_rows else _mix_ratio(alpha_logit, n_sel, nk)
    sparse_launch = _warps_stages(launch.num_warps_bwd, launch.num_stages_bwd)
    linear_launch = _warps_stages(launch.lin_warps, launch.lin_stages)

    # 1. recompute phi(K), z per key block and phi(Q) (not saved by the forward: beyond dense attention a
    #    training step holds only O, which the next layer keeps anyway, the LSE and 1/den)
    k_mean = torch.empty(BH, nk, D, device=dev, dtype=f32)
    k_block_sum = torch.empty(BH, nk, D, device=dev, dtype=f32)
    z_block = torch.empty(BH, nk, D, device=dev, dtype=f32)
    phi_k = torch.empty(BH, N, D, device=dev, dtype=k.dtype)
    forward_kernels.k_feats[(nk, BH)](k, v, k_mean, k_block_sum, z_block, z_block, phi_k,
                                      feature_k if hedgehog else z_block, *k_strides, *v_strides, N, H, nk,
                                      D=D, BLOCK_N=block_k, NEED_V_ABSMAX=False, NEGATE_PHI=False,
                                      HEDGEHOG=hedgehog, **_row_pass())
    phi_q = torch.empty(BH, N, D, device=dev, dtype=q.dtype)  # becomes psi in place (step 4)
    backward_kernels.phi_rows[(n_tiles, BH)](q, phi_q, feature_q if hedgehog else z_block, *q_strides, N, H,
                                             D=D, BLOCK=tile_m, HEDGEHOG=hedgehog, **_row_pass())

    dq = torch.empty(q.shape, device=dev, dtype=q.dtype)
    dk = torch.empty(k.shape, device=dev, dtype=k.dtype)
    dv = torch.empty(v.shape, device=dev, dtype=v.dtype)
    _, dq_strides = _dims(dq, layout)
    _, dk_strides = _dims(dk, layout)
    _, dv_strides = _dims(dv, layout)
    # with Hedgehog features the linear launches also write the gradient of the stacked logits [X W, -X W]
    # (B*H, N, D): one GEMM per side turns it into the weights' gradient
    dlogits_q, dlogits_k = (torch.empty(BH, N, D, device=dev, dtype=q.dtype) if hedgehog else z_block
                            for _ in range(2))
    feature_q_arg, feature_k_arg = (feature_q, feature_k) if hedgehog else (z_block, z_block)
    # 2. linear part of dQ; also w = rowsum(dO * O_l) for the launches below
    w = torch.empty(BH, N, device=dev, dtype=f32)
    backward_kernels.bwd_dq_lin_kernel[(_cdiv(N, lin_tile_m), BH)](
        v, do, dq, z_block, lut, w, inv_den, h_all, z_all, alpha, phi_q, phi_k, feature_q_arg, dlogits_q,
        *v_strides, *do_strides, *dq_strides, N, H, 0 if linear_keys == "all" else n_sel, nq, nk, block_q,
        D=D, BLOCK_M=lin_tile_m, BLOCK_N=block_k, HEDGEHOG=hedgehog, MIX_ROWS=mix_rows, **linear_launch,
    )
    # 3. per row: delta for the sparse launches; per tile: partial b totals and the alpha gradient
    delta = torch.empty(BH, N, device=dev, dtype=f32)
    b_partial = torch.empty(BH, n_tiles, D, device=dev, dtype=f32)
    dalpha_partial = torch.empty(BH, n_tiles, device=dev, dtype=f32)
    dlogit_rows = torch.empty(BH, N if row_grads else 0, device=dev, dtype=f32)
    backward_kernels.bwd_rows[(n_tiles, BH)](phi_q, do, o, w, inv_den, alpha, delta, b_partial, dalpha_partial,
                                             dlogit_rows if row_grads else dalpha_partial,
                                             *do_strides, *o_strides, N, H, n_tiles, D=D, BLOCK_M=tile_m,
                                             MIX_ROWS=mix_rows, ROW_GRADS=row_grads, **_row_pass())
    # 4. psi = (1 - alpha) phi(Q) / den in phi(Q)'s buffer; A_all = sum psi^T dO as a split-K GEMM
    backward_kernels.phi_to_psi[(n_tiles, BH)](phi_q, inv_den, alpha, N, H, D=D, BLOCK=tile_m, MIX_ROWS=mix_rows,
                                               **_row_pass())
    psi = phi_q
    n_splits = _split_count(BH, n_tiles)
    a_partial = torch.empty(BH, n_splits, D, D, device=dev, dtype=f32)
    backward_kernels.bwd_outer[(n_splits, BH)](psi, do, a_partial, *do_strides, N, H, n_tiles, n_splits,
                                      D=D, BLOCK_M=tile_m, **_reduction_pass(D))
    a_all = a_partial.sum(dim=1)
    b_all = b_partial.sum(dim=1)
    if row_grads:
        dalpha = dlogit_rows
    else:
        dalpha = dalpha_partial.sum(dim=1).view(B, H).sum(dim=0).to(alpha_logit.dtype)  # already d/d(alpha logit)
    # 5. sparse part of dQ over the LUT
    gluon_applies = (launch.dq_gluon or launch.dkdv_gluon) and gluon_backward.applies(
        dev, q.dtype, D, tile_m, block_k, (q, k, v, do, dq, dk, dv))
    if launch.dq_gluon and gluon_applies:
        gluon_backward.launch_dq_gluon(
            q, k, v, do, dq, lut, lse, delta, alpha, (*q_strides, *k_strides, *v_strides, *do_strides, *dq_strides),
            N, B, H, n_sel, nq, block_q, qk_scale, sm_scale, D=D, mix_rows=bool(mix_rows),
        )
    else:
        backward_kernels.bwd_dq_kernel[(n_tiles, BH)](
            q, k, v, do, dq, lut, lse, delta, alpha,
            *q_strides, *k_strides, *v_strides, *do_strides, *dq_strides, N, H, n_sel, nq, nk, block_q, qk_scale,
            sm_scale, D=D, BLOCK_M=tile_m, BLOCK_N=block_k, MIX_ROWS=mix_rows, **sparse_launch,
        )
    # 6. dK and dV over the inverted index: the linear part, then the sparse part of each
    tile_offsets, tile_ids = inverted_index(lut, N, block_q, nk, tile_m)
    # over every key block the linear part of each block's gradient takes every query tile: none to subtract
    lin_offsets = torch.zeros_like(tile_offsets) if linear_keys == "all" else tile_offsets
    backward_kernels.bwd_dkdv_lin_kernel[(nk, BH)](
        v, do, dk, dv, lin_offsets, tile_ids, w, a_all, b_all, psi, phi_k,
        *v_strides, *do_strides, *dk_strides, *dv_strides, N, H, nk, feature_k_arg, dlogits_k,
        D=D, BLOCK_M=tile_m, BLOCK_N=block_k, HEDGEHOG=hedgehog, **linear_launch,
    )
    if launch.dkdv_gluon and gluon_applies:
        gluon_backward.launch_dkdv_gluon(
            q, k, v, do, dk, dv, tile_offsets, tile_ids, lse, delta, alpha,
            (*q_strides, *k_strides, *v_strides, *do_strides, *dk_strides, *dv_strides), N, B, H, nk, qk_scale,
            sm_scale, D=D, mix_rows=bool(mix_rows),
        )
    else:
        for grad, grad_strides, grad_k in ((dk, dk_strides, True), (dv, dv_strides, False)):
            backward_kernels.bwd_dkdv_kernel[(nk, BH)](
                q, k, v, do, grad, tile_offsets, tile_ids, lse, delta, alpha,
                *q_strides, *k_strides, *v_strides, *do_strides, *grad_strides, N, H, nk, qk_scale, sm_scale,
                D=D, BLOCK_M=tile_m, BLOCK_N=block_k, GRAD_K=grad_k, MIX_ROWS=mix_rows, **sparse_launch,
            )
    if not hedgehog:
        return dq, dk, dv, dalpha, None, None
    return (dq, dk, dv, dalpha, linear.signed_weight_grad(_as_bhnd(q, layout), dlogits_q.view(B, H, N, D)),
            linear.signed_weight_grad(_as_bhnd(k, layout), dlogits_k.view(B, H, N, D)))


# --------------------------------------------------------------------------------------------------
# custom ops + autograd
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("slaconv::sla2_fwd", mutates_args=())
def sla2_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, router_q: torch.Tensor, router_k: torch.Tensor,
    alpha_logit: torch.Tensor, topk: float, block_q: int, block_k: int, quant: str, kept_start: int,
    kept_end: int, layout: str, save: bool, launch: list[int], feature_q: torch.Tensor | None = None,
    feature_k: torch.Tensor | None = None, mixing: str = "head", linear_keys: str = "unselected",
    alpha_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`forward` as a custom op: (O, LUT, LSE, 1/den, H_all, z_all, alpha per row).

    ``kept_start``, ``kept_end`` are :attr:`AttentionSpec.always_kept`; ``launch`` is :meth:`LaunchConfig.as_ints`;
    ``feature_q``, ``feature_k`` the Hedgehog signed stacks (H, D, D) or None; ``mixing`` "head", "query" or
    "query-linear" (with ``alpha_weight`` (H, D), alpha_i = sigmoid(q_i . w_h / sqrt(D) + alpha_logit_h)) or
    "query-block" (with ``alpha_weight``: alpha per row from both, the tail mass pooled per query block);
    ``linear_keys`` "unselected" or "all"."""
    spec = AttentionSpec(topk, block_q, block_k, quant, (kept_start, kept_end))
    return forward(q, k, v, router_q, router_k, alpha_logit, spec, layout, save, LaunchConfig.from_ints(launch),
                   feature_q, feature_k, mixing, linear_keys, alpha_weight)


@sla2_fwd.register_fake
def _(q, k, v, router_q, router_k, alpha_logit, topk, block_q, block_k, quant, kept_start, kept_end, layout, save,
      launch, feature_q=None, feature_k=None, mixing="head", linear_keys="unselected", alpha_weight=None):
    _check_tensors(q, k, v, layout)
    (B, H, N, D), _ = _dims(q, layout)
    nq, nk = _cdiv(N, block_q), _cdiv(N, block_k)
    n_sel = AttentionSpec(topk, block_q, block_k, quant, (kept_start, kept_end)).selected_blocks(nk)
    f32 = torch.float32
    return (
        q.new_empty(q.shape),
        q.new_empty((B, H, nq, n_sel), dtype=torch.int32),
        q.new_empty((B * H, N if save else 0), dtype=f32),
        q.new_empty((B * H, N), dtype=f32),
        q.new_empty((B * H, D, D), dtype=f32),
        q.new_empty((B * H, D), dtype=f32),
        q.new_empty((B * H, N if save and mixing in ("query", "query-linear", "query-block") else 0), dtype=f32),
    )


@torch.library.custom_op("slaconv::sla2_bwd", mutates_args=())
def sla2_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha_logit: torch.Tensor,
    lut: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, inv_den: torch.Tensor, h_all: torch.Tensor,
    z_all: torch.Tensor, block_q: int, block_k: int, layout: str, launch: list[int],
    feature_q: torch.Tensor | None = None, feature_k: torch.Tensor | None = None,
    alpha_rows: torch.Tensor | None = None, linear_keys: str = "unselected", row_grads: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`backward` as a custom op: (dQ, dK, dV, d alpha_logit, d feature_q, d feature_k), straight-through
    for the low-bit modes; the feature gradients are empty without Hedgehog features.  ``row_grads``: the
    fourth output is the gradient of each row's alpha logit (B*H, N) instead (``mixing: query-linear`` and
    ``query-block``)."""
    dq, dk, dv, dalpha, dfq, dfk = backward(do, q, k, v, alpha_logit, lut, o, lse, inv_den, h_all, z_all, block_q,
                                            block_k, layout, LaunchConfig.from_ints(launch), feature_q, feature_k,
                                            alpha_rows, linear_keys, row_grads)
    if dfq is None:
        dfq, dfk = q.new_empty(0), q.new_empty(0)
    return dq, dk, dv, dalpha, dfq, dfk


@sla2_bwd.register_fake
def _(do, q, k, v, alpha_logit, lut, o, lse, inv_den, h_all, z_all, block_q, block_k, layout, launch,
      feature_q=None, feature_k=None, alpha_rows=None, linear_keys="unselected", row_grads=False):
    def feature_grad(w):
        return q.new_empty(0) if w is None else w.new_empty(w.shape, dtype=torch.float32)

    dalpha = (alpha_rows.new_empty(alpha_rows.shape, dtype=torch.float32) if row_grads
              else alpha_logit.new_empty(alpha_logit.shape))
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dalpha,
            feature_grad(feature_q), feature_grad(feature_k))


def _setup_context(ctx, inputs, output):
    q, k, v, _router_q, _router_k, alpha_logit, _topk, block_q, block_k, _quant, _kept_start, _kept_end, layout, \
        _save, launch, feature_q, feature_k, _mixing, linear_keys, alpha_weight = inputs
    o, lut, lse, inv_den, h_all, z_all, alpha_rows = output
    ctx.save_for_backward(q, k, v, alpha_logit, lut, o, lse, inv_den, h_all, z_all, feature_q, feature_k, alpha_rows,
                          alpha_weight)
    ctx.settings = (block_q, block_k, layout, launch)
    ctx.linear_keys = linear_keys
    ctx.row_grads = alpha_weight is not None


def _autograd_backward(ctx, do, *_unused):
    q, k, v, alpha_logit, lut, o, lse, inv_den, h_all, z_all, feature_q, feature_k, alpha_rows, alpha_weight = \
        ctx.saved_tensors
    dq, dk, dv, dalpha, dfq, dfk = sla2_bwd(do, q, k, v, alpha_logit, lut, o, lse, inv_den, h_all, z_all,
                                            *ctx.settings, feature_q, feature_k, alpha_rows, ctx.linear_keys,
                                            ctx.row_grads)
    if feature_q is None:
        dfq = dfk = None
    else:
        dfq, dfk = dfq.to(feature_q.dtype), dfk.to(feature_k.dtype)
    dweight = None
    if ctx.row_grads:  # the gradient of each row's logit [detached gap +] q . w_h / sqrt(D) + a_h, on to q, w, a
        dq, dweight, dalpha = _row_term_grads(dalpha, q, alpha_weight, alpha_logit, dq, ctx.settings[2])
    return (dq, dk, dv, None, None, dalpha, None, None, None, None, None, None, None, None, None, dfq, dfk, None, None,
            dweight)


def _row_term_grads(drows, q, alpha_weight, alpha_logit, dq, layout):
    """(dQ, d alpha_weight, d alpha_logit) from the gradient of every row's alpha logit ``drows`` (B*H, N) under
    ``mixing: query-linear`` or ``query-block``, dQ added in place to the attention's own ``dq``.  One pass over dQ and one over Q
    in their own dtype: an fp32 copy of Q or of the rank-one term would cost more than the rest of the mixing."""
    q_bhnd, dq_bhnd = _as_bhnd(q, layout), _as_bhnd(dq, layout)
    batch, heads, n, head_dim = q_bhnd.shape
    drows = drows.view(batch, heads, n)
    weight = alpha_weight.float() / math.sqrt(head_dim)
    dq_bhnd.addcmul_(drows.unsqueeze(-1), weight.view(1, heads, 1, head_dim))
    dweight = torch.einsum("bhn,bhnd->hd", drows.to(q.dtype), q_bhnd).float() / math.sqrt(head_dim)
    return dq, dweight.to(alpha_weight.dtype), drows.sum(dim=(0, 2)).to(alpha_logit.dtype)


sla2_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


def sla2_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, router_q: torch.Tensor,
                          router_k: torch.Tensor, alpha_logit: torch.Tensor, spec: AttentionSpec, *,
                          layout: str = "bnhd", launch: LaunchConfig | None = None,
                          feature_q: torch.Tensor | None = None, feature_k: torch.Tensor | None = None,
                          mixing: str = "head", linear_keys: str = "unselected",
                          alpha_weight: torch.Tensor | None = None) -> torch.Tensor:
    """SLA2 attention with the Triton kernels on q, k, v in ``layout``; returns the output in that layout
    and dtype.  ``spec`` holds the settings (:class:`AttentionSpec`), ``launch`` the tile sizes, warps and
    stages (:data:`DEFAULT_LAUNCH` if None).  ``feature_q``, ``feature_k`` (H, D, D/2): the Hedgehog feature
    map's weights (both or neither; softmax features without).  ``mixing``: ``"head"`` (alpha =
    sigmoid(alpha_logit) per head) or ``"query"`` (alpha_i = sigmoid(LSE_sel_i - LSE_tail_i + alpha_logit)
    per query row, both log-sum-exps detached) or ``"query-linear"`` (alpha_i = sigmoid(q_i . w_h / sqrt(D) +
    alpha_logit) with ``alpha_weight`` w (H, D), each row's logit formed by the Q pre-pass) or ``"query-block"``
    (alpha_i = sigmoid(LSE_sel_i - LSE_pool_b + q_i . w_h / sqrt(D) + alpha_logit), LSE_pool_b the tail's pooled
    log-sum-exp from the mean query of row i's block b, both log-sum-exps detached).
    ``linear_keys``: ``"unselected"`` (the linear branch over
    the key blocks a query block did not select) or ``"all"`` (over every key block).  Differentiable w.r.t.
    q, k, v, alpha_logit, the feature weights and ``alpha_weight`` (the hard top-k router gets no gradient)."""
    _check_tensors(q, k, v, layout)
    linear.check_mixing(mixing)
    linear.check_linear_keys(linear_keys)
    if (feature_q is None) != (feature_k is None):
        raise ValueError("feature_q and feature_k must be given together")
    launch = DEFAULT_LAUNCH if launch is None else launch
    if mixing in ROW_WEIGHT_MIXINGS or alpha_weight is not None:
        (_, heads, _, head_dim), _ = _dims(q, layout)
        reference.check_alpha_weight(alpha_weight, mixing, heads, head_dim)
    if feature_q is not None:
        (_, heads, _, head_dim), _ = _dims(q, layout)
        feature_q, feature_k = (linear.signed_weights(w, heads, head_dim, q.dtype) for w in (feature_q, feature_k))
    # the tensors only the backward reads are written only when a backward can follow
    grad_inputs = [t for t in (q, k, v, alpha_logit, feature_q, feature_k, alpha_weight) if t is not None]
    save = torch.is_grad_enabled() and any(t.requires_grad for t in grad_inputs)
    kept_start, kept_end = spec.always_kept
    return sla2_fwd(q, k, v, router_q, router_k, alpha_logit, float(spec.topk), int(spec.block_q),
                    int(spec.block_k), spec.quant, int(kept_start), int(kept_end), layout, save, launch.as_ints(),
                    feature_q, feature_k, mixing, linear_keys, alpha_weight)[0]
