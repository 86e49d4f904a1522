"""What sparse attention leaves out, and the ways to stand in for it: the math of the tail-estimator study.

At a fixed block mask M (per query block, the key blocks the router keeps), one head's dense output splits
exactly, per query row i, into

    O_i = m_i O_s,i + (1 - m_i) O_t,i

with O_s the softmax over the selected key blocks (renormalised), O_t the softmax over the others (the
*tail*) and m_i = exp(lse_sel,i - lse_i) the dense mass on the selected blocks.  The estimators replace O_t
(and m) by something cheaper:

* mixed under an alpha:  ``alpha O_s + (1 - alpha) T`` with T the exact tail, SLA2's linear branch
  (phi = softmax over the head dim), a Hedgehog feature map ``[softmax(x W), softmax(-x W)]`` or the plain
  mean of the unselected values -- all of them linear attention over the complement, :func:`kernel_tail`;
* inside the shared normaliser (no alpha):  each unselected key block enters the softmax as one pooled
  logit ``q . mean(K_j) / sqrt(d) + log(b_k) + bias`` with value ``mean(V_j)``, :func:`pooled_tail`.

Everything works on fp32 (B, H, N, D) tensors with N a multiple of both block sizes and a LUT of selected
key-block ids per query block (B, H, n_qblocks, n_select).  Nothing here holds an N x N map: the exact
tail comes from the dense output and its log-sum-exp, the rest from block states.
"""

from __future__ import annotations

import math

import torch

from slaconv.kernels import reference

CHUNK_Q_BLOCKS = 8  # query blocks per chunk of the gathered sparse softmax: bounds its temporary memory


# ---------------------------------------------------------------------------------------- masks


def check_blocks(n: int, block_q: int, block_k: int) -> None:
    """ValueError unless ``n`` tokens tile into whole query and key blocks (the study needs no ragged blocks)."""
    if n % block_q or n % block_k:
        raise ValueError(f"{n} tokens do not tile into {block_q}-query / {block_k}-key blocks")


def heuristic_lut(q: torch.Tensor, k: torch.Tensor, n_select: int, block_q: int, block_k: int) -> torch.Tensor:
    """The key blocks ``slaconv convert``'s identity router keeps (SLA's pooled router): (B, H, nq, n_select)."""
    d = q.shape[-1]
    eye = torch.eye(d, device=q.device).expand(q.shape[1], d, d)
    scores = reference.router_scores(q, k, eye, eye, block_q, block_k)
    return lut_of(reference.hard_topk_mask(scores, n_select))


def lut_of(mask: torch.Tensor) -> torch.Tensor:
    """Boolean block mask (..., nq, nk) with the same count per row -> sorted int64 key-block ids."""
    return reference.mask_to_lut(mask).long()


def _gather_blocks(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """x (B, H, nk, ...) per key block, lut (B, H, nq, s) -> (B, H, nq, s, ...)."""
    b, h, nq, s = lut.shape
    flat = lut.reshape(b, h, nq * s)
    idx = flat.view(b, h, nq * s, *([1] * (x.dim() - 3))).expand(b, h, nq * s, *x.shape[3:])
    return torch.gather(x, 2, idx).view(b, h, nq, s, *x.shape[3:])


# ---------------------------------------------------------------------------------------- exact parts


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    rows_per_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense softmax attention and its natural-log log-sum-exp per row: (B, H, Nq, D), (B, H, Nq).

    ``q`` may hold fewer rows than ``k``.  On the CPU this is torch's fused flash kernel (about 4x faster
    than the chunked fp32 math it otherwise runs).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
        return o, lse
    outs, lses = [], []
    for start in range(0, q.shape[2], rows_per_chunk):
        s = (q[:, :, start : start + rows_per_chunk] @ k.transpose(-1, -2)) * scale
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.exp(s - lse.unsqueeze(-1)) @ v)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def sparse_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut: torch.Tensor, block_q: int,
                  block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the selected key blocks only, and its log-sum-exp: (B, H, Nq, D), (B, H, Nq).

    ``q`` holds the rows of the query blocks that ``lut``'s rows describe (any subset of query blocks).
    """
    b, h, nq_rows, d = q.shape
    nq = lut.shape[2]
    kb = k.view(b, h, -1, block_k, d)
    vb = v.view(b, h, -1, block_k, d)
    qb = q.view(b, h, nq, block_q, d)
    scale = 1.0 / math.sqrt(d)
    outs, lses = [], []
    for start in range(0, nq, CHUNK_Q_BLOCKS):
        part = lut[:, :, start : start + CHUNK_Q_BLOCKS]
        ks = _gather_blocks(kb, part).flatten(3, 4)  # (B, H, c, ns * bk, D)
        vs = _gather_blocks(vb, part).flatten(3, 4)
        s = (qb[:, :, start : start + CHUNK_Q_BLOCKS] @ ks.transpose(-1, -2)) * scale  # (B, H, c, bq, ns * bk)
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.exp(s - lse.unsqueeze(-1)) @ vs)
        lses.append(lse)
    return torch.cat(outs, dim=2).view(b, h, nq_rows, d), torch.cat(lses, dim=2).view(b, h, nq_rows)


def exact_tail(o: torch.Tensor, lse: torch.Tensor, o_s: torch.Tensor,
               lse_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tail O_t and the selected mass m (B, H, N, 1) from the dense and the sparse outputs.

    O = m O_s + (1 - m) O_t exactly; a row whose selected blocks hold all of its mass gets O_t = 0.
    """
    m = torch.exp(lse_s - lse).clamp(max=1.0).unsqueeze(-1)
    rest = 1.0 - m
    o_t = torch.where(rest > 0, (o - m * o_s) / rest.clamp_min(1e-30), torch.zeros_like(o))
    return o_t, m


# ---------------------------------------------------------------------------------------- linear tails


def softmax_features(x: torch.Tensor) -> torch.Tensor:
    """SLA2's feature map: softmax over the head dimension (``reference.feature_map``)."""
    return reference.feature_map(x)


def hedgehog_features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Hedgehog's feature map ``[softmax(x W), softmax(-x W)]`` per head: x (B, H, N, d), w (H, d, n) -> 2n.

    Nonnegative, and each token's features sum to 2.
    """
    z = torch.einsum("bhnd,hde->bhne", x, w)
    return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)


def constant_features(x: torch.Tensor) -> torch.Tensor:
    """One feature equal to 1: linear attention with these is the plain mean of the unselected values."""
    return torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)


def block_states(phi_k: torch.Tensor, v: torch.Tensor, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key block ``phi(K_j)^T V_j`` (B, H, nk, F, D) and ``phi(K_j)^T 1`` (B, H, nk, F)."""
    b, h, n, f = phi_k.shape
    fk = phi_k.view(b, h, -1, block_k, f)
    return fk.transpose(-1, -2) @ v.view(b, h, -1, block_k, v.shape[-1]), fk.sum(dim=3)


def kernel_tail(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, lut: torch.Tensor, block_q: int,
                block_k: int, eps: float = reference.LINEAR_EPS, states=None, over_all: bool = False) -> torch.Tensor:
    """Linear attention over exactly the unselected key blocks, as the kernels compute it.

    ``phi(q_i) H_i / (phi(q_i) . z_i + eps)`` with ``H_i = H_all - sum_{j in M_i} phi(K_j)^T V_j`` and ``z_i``
    likewise; phi_q (B, H, Nq, F) for the query blocks of ``lut``, phi_k (B, H, N, F), v (B, H, N, D).
    ``states``: :func:`block_states` of phi_k and v when the caller has them (phi_k and v are then unused).
    ``over_all``: over every key block instead (H_all, z_all: no per-query-block state to build).
    """
    states, sums = block_states(phi_k, v, block_k) if states is None else states
    b, h, _, f, d = states.shape
    nq = lut.shape[2]
    h_rest = states.sum(dim=2, keepdim=True)  # (B, H, 1, F, D)
    z_rest = sums.sum(dim=2, keepdim=True)  # (B, H, 1, F)
    if not over_all:
        h_rest = h_rest - _gather_blocks(states, lut).sum(dim=3)  # (B, H, nq, F, D)
        z_rest = z_rest - _gather_blocks(sums, lut).sum(dim=3)  # (B, H, nq, F)
    fq = phi_q.reshape(b, h, nq, block_q, f)
    num = fq @ h_rest
    den = (fq @ z_rest.unsqueeze(-1)) + eps
    return (num / den).reshape(b, h, nq * block_q, d)


# ---------------------------------------------------------------------------------------- pooled tail


def pooled_parts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut: torch.Tensor, lse_s: torch.Tensor,
                 block_q: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled tail's output and its log-odds against the selected blocks, before any bias.

    Each unselected key block j contributes the logit ``q . mean(K_j) / sqrt(d) + log(b_k)`` and the value
    ``mean(V_j)``.  Returns T (B, H, Nq, D), the softmax over those pooled logits alone, and the gap
    ``lse_s - lse_pooled`` (B, H, Nq): the shared normaliser gives the selected blocks the weight
    ``sigmoid(gap - bias)`` (:func:`pooled_mix`).
    """
    b, h, _, d = q.shape
    nk = k.shape[2] // block_k
    v_bar = v.view(b, h, nk, block_k, d).mean(dim=3)
    logits = pooled_logits(q, k, lut, block_q, block_k)
    lse_p = torch.logsumexp(logits, dim=-1)
    t = torch.softmax(logits, dim=-1) @ v_bar
    return torch.nan_to_num(t), lse_s - lse_p


def pooled_logits(q: torch.Tensor, k: torch.Tensor, lut: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Per row and key block the pooled logit ``q . mean(K_j) / sqrt(d) + log(b_k)``, -inf on the selected blocks:
    (B, H, Nq, nk).  Its log-sum-exp estimates the log of the tail's unnormalised softmax mass."""
    b, h, _, d = q.shape
    nk = k.shape[2] // block_k
    k_bar = k.view(b, h, nk, block_k, d).mean(dim=3)
    logits = (q @ k_bar.transpose(-1, -2)) / math.sqrt(d) + math.log(block_k)
    selected = reference.lut_to_mask(lut, nk).repeat_interleave(block_q, dim=2)
    return logits.masked_fill(selected, float("-inf"))


def pooled_mix(o_s: torch.Tensor, t: torch.Tensor, gap: torch.Tensor, bias: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``w O_s + (1 - w) T`` with ``w = sigmoid(gap - bias)``: the selected logits and the pooled ones (raised
    by ``bias``, a float or one value per head) softmaxed together."""
    if isinstance(bias, torch.Tensor):
        bias = bias.view(1, -1, 1)
    w = torch.sigmoid(gap - bias).unsqueeze(-1)
    return w * o_s + (1 - w) * t


# ---------------------------------------------------------------------------------------- mixing


def expand_alpha(alpha: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per-head (H,) or per-(head, query block) (H, nq) alpha -> broadcastable against (B, H, N, D)."""
    if alpha.dim() == 1:
        return alpha.view(1, -1, 1, 1)
    return alpha.repeat_interleave(n_rows // alpha.shape[1], dim=1).view(1, alpha.shape[0], n_rows, 1)


def mix(o_s: torch.Tensor, tail: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``alpha O_s + (1 - alpha) T`` with alpha per head (H,) or per head and query block (H, nq)."""
    a = expand_alpha(alpha, o_s.shape[2])
    return a * o_s + (1 - a) * tail


def mix_stats(o: torch.Tensor, o_s: torch.Tensor, tail: torch.Tensor, block_q: int) -> dict[str, torch.Tensor]:
    """Sufficient statistics of ``||alpha O_s + (1 - alpha) T - O||^2`` per (B, H, query block), in float64.

    The squared error at alpha is ``a2 alpha^2 + 2 a1 alpha + a0``; ``row_best`` is the error left when every
    query row takes its own least-squares alpha (clamped to [0, 1]); ``ref`` is ``||O||^2``.
    """
    b, h, n, d = o.shape
    diff = (o_s - tail).double()
    off = (tail - o).double()
    a2r, a1r, a0r = diff.square().sum(-1), (diff * off).sum(-1), off.square().sum(-1)  # (B, H, N)
    alpha_r = (-a1r / a2r.clamp_min(1e-300)).clamp(0.0, 1.0)
    best_r = alpha_r.square() * a2r + 2 * alpha_r * a1r + a0r

    def per_block(x):
        return x.view(b, h, n // block_q, block_q).sum(dim=-1)

    return {"a2": per_block(a2r), "a1": per_block(a1r), "a0": per_block(a0r), "row_best": per_block(best_r),
            "ref": per_block(o.double().square().sum(-1))}


def squared_error_per_block(o: torch.Tensor, estimate: torch.Tensor, block_q: int) -> torch.Tensor:
    """``||estimate - O||^2`` per (B, H, query block), float64."""
    b, h, n, _ = o.shape
    return (estimate - o).double().square().sum(-1).view(b, h, n // block_q, block_q).sum(-1)


def least_squares_alpha(a2: torch.Tensor, a1: torch.Tensor) -> torch.Tensor:
    """The alpha in [0, 1] minimising ``a2 alpha^2 + 2 a1 alpha`` (sums already taken over what it is shared by)."""
    return (-a1 / a2.clamp_min(1e-300)).clamp(0.0, 1.0)


def mixed_squared_error(stats: dict[str, torch.Tensor], alpha: torch.Tensor) -> torch.Tensor:
    """Squared error per (B, H, query block) of the mix at ``alpha``, broadcast against (B, H, nq)."""
    return alpha.square() * stats["a2"] + 2 * alpha * stats["a1"] + stats["a0"]
