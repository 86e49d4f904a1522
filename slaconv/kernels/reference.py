"""SLA2 attention in plain PyTorch: the CPU path and the oracle for the Triton kernels.

Everything here works on tensors in (B, H, N, D) layout; :mod:`slaconv.kernels.ops` adapts the
(B, N, H, D) layout that diffusers hands its processors.  The math is docs/design.md section 1:

* router: ``S_c = (meanpool_bq(Q) W_q)(meanpool_bk(K - mean(K)) W_k)^T / sqrt(d)``, per head;
* mask: hard top-k per query-block row (``n_k`` key blocks, at least one), or SoftTop-k; an optional
  always-kept range of key blocks (the text of joint attention) is selected in every row besides them;
* ``O_s``: softmax over the selected key blocks only (renormalised);
* ``O_l``: linear attention over exactly the complement, with ``phi = softmax over the head dim`` or, given
  per-head feature weights ``W`` (H, d, d/2), the Hedgehog map ``phi(x) = [softmax(x W), softmax(-x W)]``;
* ``O = alpha * O_s + (1 - alpha) * O_l`` with, per ``mixing``, ``alpha = sigmoid(alpha_logit)`` per head
  (``head``) or per query row ``alpha_i = sigmoid(lse_sel,i - lse_tail,i + alpha_logit)`` (``query``), where
  ``lse_sel`` is the sparse branch's own log row sum and ``lse_tail`` the log-sum-exp over the unselected key
  blocks of the pooled logits ``q . mean(K_j) / sqrt(d) + ln n_j`` (both detached, :func:`pooled_tail_lse`),
  or ``alpha_i = sigmoid(q_i . w / sqrt(d) + alpha_logit)`` with a learned weight ``w`` (d,) per head
  (``query-linear``), or both, ``alpha_i = sigmoid(lse_sel,i - lse_pool,b + q_i . w / sqrt(d) + alpha_logit)``
  with ``lse_pool,b`` the pooled tail log-sum-exp of the row's query block b from its mean query (detached,
  ``query-block``); a row that selects every key block has no linear branch, and its output is ``O_s``.

Memory stays bounded: queries are processed a chunk of query blocks at a time, so the largest
temporary is ``(B, H, chunk * b_q, N)``, never a whole ``N x N`` map per head.  A soft block mask
``m`` in [0, 1] weights the sparse branch's exponentials by ``m`` and the linear branch's kernel
entries by ``1 - m``; at ``m in {0, 1}`` this is exactly the hard form.
"""

from __future__ import annotations

import math

import torch

from ..config import LINEAR_KEYS, MIXINGS, QUANT_MODES, ROW_WEIGHT_MIXINGS

LOG2E = 1.4426950408889634
FP8_E4M3_MAX = 448.0
INT8_MAX = 127.0
LINEAR_EPS = 1e-6

__all__ = [
    "block_count",
    "block_mean",
    "topk_count",
    "selection_count",
    "check_always_kept",
    "router_scores",
    "hard_topk_mask",
    "soft_topk_mask",
    "selection_mask",
    "mask_to_lut",
    "lut_to_mask",
    "feature_map",
    "pooled_tail_lse",
    "fake_quant_int8_blocks",
    "fake_quant_fp8",
    "sla2_attention_reference",
    "full_attention_reference",
    "initial_alpha",
    "fit_query_shift",
]


def block_count(n: int, block: int) -> int:
    """Number of blocks of ``block`` tokens covering ``n`` tokens (the last one may be ragged)."""
    return -(-n // block)


def block_mean(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over consecutive blocks of tokens, (B, H, N, D) -> (B, H, ceil(N/block), D), in fp32.

    A ragged last block is averaged over its true token count.
    """
    b, h, n, d = x.shape
    nb = block_count(n, block)
    pad = nb * block - n
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
    sums = xf.view(b, h, nb, block, d).sum(dim=3)
    counts = torch.full((nb,), float(block), device=x.device)
    counts[-1] = block - pad
    return sums / counts.view(1, 1, nb, 1)


def topk_count(topk: float, n_kblocks: int) -> int:
    """Key blocks kept per query-block row: ``clamp(round(topk * n_kblocks), 1, n_kblocks)``."""
    return int(min(max(round(topk * n_kblocks), 1), n_kblocks))


def selection_count(topk: float, n_kblocks: int, always_kept: tuple[int, int] = (0, 0)) -> int:
    """Key blocks selected per row: the ``always_kept`` range ``[start, end)`` plus
    :func:`topk_count` of the other blocks (none when the range covers every block)."""
    kept = always_kept[1] - always_kept[0]
    return kept + topk_count(topk, n_kblocks - kept)


def check_always_kept(always_kept: tuple[int, int], n_kblocks: int) -> None:
    """Raise ``ValueError`` unless ``always_kept`` is a key-block range ``[start, end)`` within ``n_kblocks``."""
    start, end = always_kept
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= n_kblocks):
        raise ValueError(f"always_kept must be a key-block range [start, end) within 0..{n_kblocks}, "
                         f"got {always_kept!r}")


def router_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    router_q: torch.Tensor,
    router_k: torch.Tensor,
    block_q: int,
    block_k: int,
) -> torch.Tensor:
    """Block scores ``(Qbar W_q)(Kbar W_k)^T / sqrt(d)`` in fp32, shape (B, H, n_qblocks, n_kblocks).

    ``router_q`` and ``router_k`` are (H, d, d); K is smoothed (its token mean removed) before
    pooling.  With identity projections this is SLA's pooled heuristic router.
    """
    d = q.shape[-1]
    k_smooth = k.float() - k.float().mean(dim=2, keepdim=True)
    q_bar = block_mean(q, block_q)
    k_bar = block_mean(k_smooth, block_k)
    q_proj = torch.einsum("bhnd,hde->bhne", q_bar, router_q.float())
    k_proj = torch.einsum("bhnd,hde->bhne", k_bar, router_k.float())
    return torch.einsum("bhqe,bhke->bhqk", q_proj, k_proj) / math.sqrt(d)


def hard_topk_mask(scores: torch.Tensor, n_select: int) -> torch.Tensor:
    """Boolean mask selecting the ``n_select`` highest-scoring key blocks of every row."""
    idx = torch.topk(scores, n_select, dim=-1).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, idx, True)


def soft_topk_mask(scores: torch.Tensor, n_select: int, tau: float = 0.1, iters: int = 48) -> torch.Tensor:
    """SoftTop-k: ``sigmoid(S / tau + lambda_i)`` with ``lambda_i`` found by bisection.

    Each row then sums to ``n_select`` (to fp32 precision).  ``lambda`` is detached: gradients
    reach the scores only through the sigmoid, as in the SMART pruner's reparameterisation.
    """
    z = scores.float() / tau
    with torch.no_grad():
        lo = -z.amax(dim=-1, keepdim=True) - 40.0
        hi = -z.amin(dim=-1, keepdim=True) + 40.0
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            too_many = torch.sigmoid(z + mid).sum(dim=-1, keepdim=True) > n_select
            hi = torch.where(too_many, mid, hi)
            lo = torch.where(too_many, lo, mid)
        lam = 0.5 * (lo + hi)
    return torch.sigmoid(z + lam)


def selection_mask(scores: torch.Tensor, topk: float, always_kept: tuple[int, int] = (0, 0),
                   soft_tau: float | None = None) -> torch.Tensor:
    """The block mask of the router's ``scores`` (B, H, nq, nk): every block of the ``always_kept`` range,
    plus the :func:`topk_count` best of the others, hard (bool) or SoftTop-k at ``soft_tau`` (float, the
    kept blocks at exactly 1).  The kept blocks take no part in the ranking."""
    nk = scores.shape[-1]
    check_always_kept(always_kept, nk)
    start, end = always_kept
    n_route = topk_count(topk, nk - (end - start))
    if soft_tau is None:
        ranked = scores.float().clone()
        ranked[..., start:end] = float("inf")
        return hard_topk_mask(ranked, (end - start) + n_route)
    others = torch.cat([scores[..., :start], scores[..., end:]], dim=-1)
    soft = soft_topk_mask(others, n_route, soft_tau) if n_route else others.float()  # no column left
    kept = torch.ones(*scores.shape[:-1], end - start, device=scores.device)
    return torch.cat([soft[..., :start], kept, soft[..., start:]], dim=-1)


def mask_to_lut(mask: torch.Tensor) -> torch.Tensor:
    """Hard mask (B, H, nq, nk) with the same count per row -> sorted int32 key-block ids (B, H, nq, n)."""
    n = int(mask[0, 0, 0].sum()) if mask.numel() else 0
    idx = torch.topk(mask.to(torch.int8), n, dim=-1).indices
    return idx.sort(dim=-1).values.to(torch.int32)


def lut_to_mask(lut: torch.Tensor, n_kblocks: int) -> torch.Tensor:
    """The inverse of :func:`mask_to_lut`: key-block ids (..., nq, n) -> boolean block mask (..., nq, n_kblocks)."""
    mask = torch.zeros(*lut.shape[:-1], n_kblocks, dtype=torch.bool, device=lut.device)
    return mask.scatter_(-1, lut.long(), True)


def feature_map(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """phi for the linear branch on (B, H, N, d) ``x``, in fp32.

    Without ``weight``: softmax over the head dimension.  With per-head ``weight`` (H, d, d/2): the Hedgehog
    map ``[softmax(x W_h), softmax(-x W_h)]``, whose two halves each sum to 1 and whose width is d again.
    """
    if weight is None:
        return torch.softmax(x.float(), dim=-1)
    proj = torch.einsum("bhnd,hde->bhne", x.float(), weight.float())
    return torch.cat([torch.softmax(proj, dim=-1), torch.softmax(-proj, dim=-1)], dim=-1)


def pooled_tail_lse(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, block_k: int) -> torch.Tensor:
    """Per row, the log-sum-exp over key blocks j of ``q . mean(K_j) / sqrt(d) + ln n_j + ln(1 - m_j)``: an estimate
    of the log of the unselected keys' unnormalised softmax mass, pooled per key block (Jensen: never above the
    exact one).  q (B, H, R, d), k (B, H, N, d), ``weights`` the rows' block mask m (B, H, R, n_kblocks), 1 on
    the selected blocks (a row with every block selected gets -inf); returns (B, H, R, 1) in fp32, detached."""
    with torch.no_grad():
        n, nk = k.shape[2], weights.shape[-1]
        counts = (n - block_k * torch.arange(nk, device=k.device)).clamp(max=block_k).float()  # ragged last block
        logits = (q.float() @ block_mean(k, block_k).transpose(-1, -2)) / math.sqrt(q.shape[-1]) + counts.log()
        return torch.logsumexp(logits + torch.log1p(-weights.float().clamp(max=1.0)), dim=-1, keepdim=True)


def _straight_through(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    return x + (xq - x).detach()


def fake_quant_int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Symmetric INT8 quantise-dequantise with one scale per (B, H, token block); straight-through."""
    b, h, n, d = x.shape
    nb = block_count(n, block)
    pad = nb * block - n
    xf = x.float()
    xp = torch.nn.functional.pad(xf, (0, 0, 0, pad)) if pad else xf
    xb = xp.view(b, h, nb, block, d)
    scale = xb.detach().abs().amax(dim=(3, 4), keepdim=True).clamp_min(1e-8) / INT8_MAX
    xq = (torch.round(xb / scale).clamp(-INT8_MAX, INT8_MAX) * scale).view(b, h, nb * block, d)[:, :, :n]
    return _straight_through(xf, xq)


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 e4m3 quantise-dequantise of ``x / scale`` (scale broadcast); straight-through."""
    xf = x.float()
    xq = (xf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float() * scale
    return _straight_through(xf, xq)


def _expand_blocks(m: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """(..., n_blocks) block values -> (..., n) token values."""
    return m.repeat_interleave(block, dim=-1)[..., :n]


def sla2_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, router_q: torch.Tensor,
                             router_k: torch.Tensor, alpha_logit: torch.Tensor, *, topk: float, block_q: int = 128,
                             block_k: int = 64, quant: str = "none", soft_tau: float | None = None,
                             q_blocks: torch.Tensor | None = None, chunk_q_blocks: int = 8,
                             mask: torch.Tensor | None = None, always_kept: tuple[int, int] = (0, 0),
                             feature_q: torch.Tensor | None = None,
                             feature_k: torch.Tensor | None = None, mixing: str = "head",
                             linear_keys: str = "unselected", alpha_weight: torch.Tensor | None = None,
                             ) -> torch.Tensor:
    """SLA2 attention on (B, H, N, D) tensors; returns (B, H, N, D) in ``q.dtype``.

    ``topk``, ``block_q``, ``block_k`` and ``quant`` mean what they mean in
    :class:`slaconv.kernels.spec.AttentionSpec`; here the low-bit modes are emulated by straight-through
    fake quantisation of the sparse branch, and any block size works.

    Args:
        soft_tau: if set, use SoftTop-k with this temperature instead of the hard mask (stage 1).
        q_blocks: optional 1-D tensor of query-block ids; only those rows are computed and the
            result is (B, H, len(q_blocks) * block_q clipped to N, D) in that order.  Used by
            stage-1 calibration to bound memory.
        mask: optional precomputed block mask (bool or float in [0, 1]), overriding the router.
        always_kept: key-block range ``[start, end)`` every query block selects besides its top-k
            (:func:`selection_mask`).
        feature_q, feature_k: per-head Hedgehog weights (H, d, d/2) of the linear branch's feature map
            for queries and keys (:func:`feature_map`); both or neither (then phi is softmax over d).
        mixing: ``head`` (alpha per head) or ``query`` (alpha per row from the estimated tail mass, with
            ``alpha_logit`` a per-head log-scale correction; the sparse log row sum is taken from the same,
            possibly quantised, scores the sparse branch uses), ``query-linear`` (alpha per row from the
            query alone, ``sigmoid(q . alpha_weight / sqrt(d) + alpha_logit)``) or ``query-block`` (both, the
            tail mass estimated once per query block from its mean query).
        alpha_weight: the (H, d) weights of ``query-linear`` and ``query-block`` (required by them, refused
            otherwise).
        linear_keys: ``unselected`` (the linear branch over the keys the row's block did not select, weighted
            by ``1 - mask`` when it is soft) or ``all`` (over every key).
    """
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
    if (feature_q is None) != (feature_k is None):
        raise ValueError("feature_q and feature_k must be given together")
    if mixing not in MIXINGS:
        raise ValueError(f"mixing must be one of {MIXINGS}, got {mixing!r}")
    if linear_keys not in LINEAR_KEYS:
        raise ValueError(f"linear_keys must be one of {LINEAR_KEYS}, got {linear_keys!r}")
    b, h, n, d = q.shape
    check_alpha_weight(alpha_weight, mixing, h, d)
    nq = block_count(n, block_q)
    if mask is None:
        scores = router_scores(q, k, router_q, router_k, block_q, block_k)
        mask = selection_mask(scores, topk, always_kept, soft_tau)
    weights = mask.float()
    if q_blocks is None:
        q_blocks = torch.arange(nq, device=q.device)
    sm_scale = 1.0 / math.sqrt(d)

    kf, vf = k.float(), v.float()
    if quant != "none":
        # Softmax is invariant to shifting K by its token mean; quantise the smoothed K.
        k_pooled = kf - kf.mean(dim=2, keepdim=True).detach()
        k_for_scores = fake_quant_int8_blocks(k_pooled, block_k)
        q_for_scores = fake_quant_int8_blocks(q.float() * (sm_scale * LOG2E), block_q)
    else:
        k_for_scores = k_pooled = kf
        q_for_scores = q.float() * (sm_scale * LOG2E)
    if quant == "int8-fp8":
        v_scale = vf.detach().abs().amax(dim=2, keepdim=True).clamp_min(1e-8) / FP8_E4M3_MAX
        v_sparse = fake_quant_fp8(vf, v_scale)
    else:
        v_sparse = vf
    phi_k = feature_map(k, feature_k)
    head_alpha = torch.sigmoid(alpha_logit.float()).view(1, h, 1, 1)
    q_block_means = block_mean(q.detach(), block_q) if mixing == "query-block" else None

    outs = []
    for start in range(0, len(q_blocks), chunk_q_blocks):
        blocks = q_blocks[start : start + chunk_q_blocks]
        rows = (blocks.view(-1, 1) * block_q + torch.arange(block_q, device=q.device).view(1, -1)).view(-1)
        rows = rows[rows < n]
        row_block = rows // block_q
        w = _expand_blocks(weights[:, :, row_block], block_k, n)  # (B, H, r, N)

        s2 = q_for_scores[:, :, rows] @ k_for_scores.transpose(-1, -2)  # log2-domain logits
        log_w = torch.log(w.clamp_min(1e-30)).masked_fill(w <= 0, float("-inf"))
        s2 = s2 + log_w * LOG2E
        row_max = s2.amax(dim=-1, keepdim=True).detach()
        p = torch.exp2(s2 - row_max)
        denom = p.sum(dim=-1, keepdim=True)
        if quant == "int8-fp8":
            p = fake_quant_fp8(p, torch.tensor(1.0 / FP8_E4M3_MAX, device=q.device))
        o_s = (p @ v_sparse) / denom
        if mixing in ("query", "query-block"):
            lse_sel = (row_max + torch.log2(denom.detach())) / LOG2E
            if mixing == "query":  # the pooled estimate keys by the same K as the scores, so the logs agree
                lse_tail = pooled_tail_lse(q[:, :, rows], k_pooled, weights[:, :, row_block], block_k)
                alpha = torch.sigmoid(lse_sel - lse_tail + alpha_logit.float().view(1, h, 1, 1))
            else:
                # one estimate per query block, from its mean query, in the keys' own frame; moved into the
                # low-bit frame (keys less their mean) by the row's own q . mean(K), as lse_sel is, so alpha
                # does not depend on the frame
                lse_tail = pooled_tail_lse(q_block_means[:, :, row_block], kf, weights[:, :, row_block], block_k)
                if quant != "none":
                    key_mean = kf.detach().mean(dim=2, keepdim=True)
                    lse_tail = lse_tail - (q[:, :, rows].detach().float() @ key_mean.transpose(-1, -2)) * sm_scale
                row_logits = query_linear_alpha_logits(q[:, :, rows], alpha_weight, alpha_logit).unsqueeze(-1)
                alpha = torch.sigmoid(lse_sel - lse_tail + row_logits)
        elif mixing == "query-linear":
            alpha = query_linear_alpha(q[:, :, rows], alpha_weight, alpha_logit)
        else:
            alpha = head_alpha

        phi_q = feature_map(q[:, :, rows], feature_q)
        kern = phi_q @ phi_k.transpose(-1, -2)
        if linear_keys == "unselected":
            kern = kern * (1.0 - w)
        o_l = (kern @ vf) / (kern.sum(dim=-1, keepdim=True) + LINEAR_EPS)
        # a row that selects every key block leaves the linear branch nothing: its output is O_s alone
        # (and alpha gets no gradient from it)
        row_alpha = torch.where((w >= 1).all(dim=-1, keepdim=True), torch.ones_like(alpha), alpha)
        outs.append(row_alpha * o_s + (1.0 - row_alpha) * o_l)
    return torch.cat(outs, dim=2).to(q.dtype)


def check_alpha_weight(alpha_weight: torch.Tensor | None, mixing: str, heads: int, head_dim: int) -> None:
    """Raise ``ValueError`` unless ``alpha_weight`` is an (H, d) tensor and ``mixing`` one of
    :data:`~slaconv.config.ROW_WEIGHT_MIXINGS`, or it is None and ``mixing`` is anything else."""
    if mixing in ROW_WEIGHT_MIXINGS:
        if alpha_weight is None or tuple(alpha_weight.shape) != (heads, head_dim):
            got = None if alpha_weight is None else tuple(alpha_weight.shape)
            raise ValueError(f"mixing {mixing!r} needs alpha_weight of shape ({heads}, {head_dim}), got {got}")
    elif alpha_weight is not None:
        raise ValueError(f"alpha_weight is read only with mixing {' or '.join(map(repr, ROW_WEIGHT_MIXINGS))}, "
                         f"not {mixing!r}")


def query_linear_alpha_logits(q: torch.Tensor, alpha_weight: torch.Tensor, alpha_logit: torch.Tensor) -> torch.Tensor:
    """The alpha logits per query row of ``mixing: query-linear``, ``q . w_h / sqrt(d) + a_h``: q (B, H, R, d),
    ``alpha_weight`` (H, d), ``alpha_logit`` (H,); returns (B, H, R) fp32, differentiable in all three."""
    d = q.shape[-1]
    logits = torch.einsum("bhrd,hd->bhr", q.float(), alpha_weight.float()) / math.sqrt(d)
    return logits + alpha_logit.float().view(1, -1, 1)


def query_linear_alpha(q: torch.Tensor, alpha_weight: torch.Tensor, alpha_logit: torch.Tensor) -> torch.Tensor:
    """alpha per query row of ``mixing: query-linear``, ``sigmoid`` of :func:`query_linear_alpha_logits`, as
    (B, H, R, 1)."""
    return torch.sigmoid(query_linear_alpha_logits(q, alpha_weight, alpha_logit)).unsqueeze(-1)


def full_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_rows: torch.Tensor | None = None, chunk: int = 1024
) -> torch.Tensor:
    """Dense softmax attention on (B, H, N, D), chunked over query rows; optional row subset."""
    d = q.shape[-1]
    if q_rows is None:
        q_rows = torch.arange(q.shape[2], device=q.device)
    outs = []
    for start in range(0, len(q_rows), chunk):
        rows = q_rows[start : start + chunk]
        s = (q[:, :, rows].float() @ k.float().transpose(-1, -2)) / math.sqrt(d)
        outs.append(torch.softmax(s, dim=-1) @ v.float())
    return torch.cat(outs, dim=2).to(q.dtype)


@torch.no_grad()
def initial_alpha(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor,
    block_q: int,
    block_k: int,
    max_rows: int = 1024,
) -> torch.Tensor:
    """Mean full-attention probability mass that ``mask`` selects, per head: (H,) in fp32.

    This is SLA2's alpha = P*M summed over a row, averaged over (a sample of) rows and the batch.
    """
    b, h, n, d = q.shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = torch.randperm(n, generator=gen)[:max_rows].sort().values.to(q.device)
    s = (q[:, :, rows].float() @ k.float().transpose(-1, -2)) / math.sqrt(d)
    p = torch.softmax(s, dim=-1)
    w = _expand_blocks(mask.float()[:, :, rows // block_q], block_k, n)
    return (p * w).sum(dim=-1).mean(dim=(0, 2))



SHIFT_GRID = (-8.0, 8.0, 0.02)
"""The candidates :func:`fit_query_shift` tries: start, stop and step of a grid of alpha logits."""


@torch.no_grad()
def fit_query_shift(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, block_q: int,
                    block_k: int, feature_q: torch.Tensor | None = None, feature_k: torch.Tensor | None = None,
                    max_q_blocks: int = 8, linear_keys: str = "unselected", mixing: str = "query") -> torch.Tensor:
    """Per head, the ``alpha_logit`` of ``mixing: query`` that minimises the squared error of SLA2's output against
    full attention on (a sample of) ``max_q_blocks`` query blocks, searched on :data:`SHIFT_GRID`: (H,) fp32.

    The mix is ``alpha_i O_s + (1 - alpha_i) O_l`` with ``alpha_i = sigmoid(lse_sel - lse_tail + c)``, so the
    error is a quadratic in alpha_i per row and each candidate costs a pass over per-row scalars.  ``linear_keys``
    is the linear branch's setting (:func:`sla2_attention_reference`); ``mixing="query-block"`` pools the tail
    from each query block's mean query (its query weight is 0 at this point, so that is its whole logit).
    """
    b, h, n, d = q.shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    blocks = torch.randperm(block_count(n, block_q), generator=gen)[:max_q_blocks].sort().values.to(q.device)
    eye = torch.eye(d, device=q.device).expand(h, d, d)
    branch = {}
    for name, logit in (("sparse", math.inf), ("linear", -math.inf)):
        branch[name] = sla2_attention_reference(
            q, k, v, eye, eye, torch.full((h,), logit, device=q.device), topk=1.0, block_q=block_q,
            block_k=block_k, q_blocks=blocks, mask=mask, feature_q=feature_q, feature_k=feature_k,
            linear_keys=linear_keys).float()
    rows = (blocks.view(-1, 1) * block_q + torch.arange(block_q, device=q.device).view(1, -1)).view(-1)
    rows = rows[rows < n]
    dense = full_attention_reference(q, k, v, q_rows=rows).float()
    row_mask = mask.float()[:, :, rows // block_q]
    s = (q[:, :, rows].float() @ k.float().transpose(-1, -2)) / math.sqrt(d)
    lse_sel = torch.logsumexp(s + torch.log(_expand_blocks(row_mask, block_k, n)), dim=-1)
    q_tail = q[:, :, rows] if mixing == "query" else block_mean(q, block_q)[:, :, rows // block_q]
    gap = (lse_sel - pooled_tail_lse(q_tail, k, row_mask, block_k)[..., 0]).double()
    x = (branch["sparse"] - branch["linear"]).double()
    a2, a1 = x.square().sum(-1), (x * (branch["linear"] - dense).double()).sum(-1)  # (B, H, R)
    grid = torch.arange(*SHIFT_GRID, dtype=torch.float64, device=q.device)
    errors = torch.stack([(a.square() * a2 + 2 * a * a1).sum(dim=(0, 2)) for a in
                          (torch.sigmoid(gap + c) for c in grid)], dim=-1)  # (H, G)
    return grid[errors.argmin(dim=-1)].float()
