"""Fitting the tail estimators that have parameters, on training videos: the pooled tail's per-head logit bias
and Hedgehog's per-head feature maps.

Both fit on :class:`FitRows`: one layer of one training sample, keys and values whole, queries and their
dense and sparse outputs on a random subset of query blocks (targets for every row would cost a dense
attention per step).  Masks are the identity router's, as after ``slaconv convert``.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from slaconv.quality import tail_estimators as te


@dataclasses.dataclass
class FitRows:
    """One layer of one sample: q (1, H, R, D) on the chosen query blocks, k and v (1, H, N, D), and per
    top-k fraction the LUT of those blocks, the dense output o and the sparse output o_s with its lse."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    luts: dict[float, torch.Tensor]
    o_s: dict[float, torch.Tensor]
    lse_s: dict[float, torch.Tensor]
    lse: torch.Tensor | None = None
    """The dense log-sum-exp of each chosen row (1, H, R)."""


def fit_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: dict[float, int], block_q: int,
             block_k: int, n_blocks: int, generator: torch.Generator) -> FitRows:
    """The training rows of one layer: ``n_blocks`` random query blocks of q, k, v (1, H, N, D).

    ``counts`` maps a top-k fraction to its key-block count; the router sees every query (as it would).
    """
    nq = q.shape[2] // block_q
    blocks = torch.randperm(nq, generator=generator)[:n_blocks].sort().values
    rows = (blocks.view(-1, 1) * block_q + torch.arange(block_q).view(1, -1)).view(-1).to(q.device)
    q_sub = q[:, :, rows].contiguous()
    o, lse = te.dense_attention(q_sub, k, v)
    luts, o_s, lse_s = {}, {}, {}
    for f, count in counts.items():
        luts[f] = te.heuristic_lut(q, k, count, block_q, block_k)[:, :, blocks.to(q.device)].contiguous()
        o_s[f], lse_s[f] = te.sparse_branch(q_sub, k, v, luts[f], block_q, block_k)
    return FitRows(q_sub, k, v, o, luts, o_s, lse_s, lse)


# ---------------------------------------------------------------------------------------- pooled bias

BIAS_GRID = torch.arange(-4.0, 8.0 + 1e-9, 0.02)  # candidate per-head biases of the pooled logits


@torch.no_grad()
def fit_pooled_bias(data: list[FitRows], fraction: float, block_q: int, block_k: int) -> torch.Tensor:
    """Per head, the bias of the pooled logits (searched on a 0.02 grid over [-4, 8]) that minimises the
    summed squared error of the pooled estimator against the dense output: (H,).

    The bias only moves the weight ``w = sigmoid(gap - bias)`` of the selected blocks, and the error of
    ``w O_s + (1 - w) T`` is a quadratic in w per row, so every candidate costs one pass over scalars.
    """
    total = None
    for r in data:
        t, gap = te.pooled_parts(r.q, r.k, r.v, r.luts[fraction], r.lse_s[fraction], block_q, block_k)
        x, y = (r.o_s[fraction] - t).double(), (t - r.o).double()
        a2, a1, a0 = x.square().sum(-1)[0], (x * y).sum(-1)[0], y.square().sum(-1)[0]  # (H, R)
        w = torch.sigmoid(gap[0].double().unsqueeze(-1) - BIAS_GRID.double().to(gap.device))  # (H, R, G)
        err = (w.square() * a2.unsqueeze(-1) + 2 * w * a1.unsqueeze(-1) + a0.unsqueeze(-1)).sum(dim=1)  # (H, G)
        total = err if total is None else total + err
    return BIAS_GRID.to(total.device)[total.argmin(dim=-1)].float()


# ---------------------------------------------------------------------------------------- Hedgehog


def hedgehog_init(heads: int, dim: int, width: int, seed: int = 0) -> torch.Tensor:
    """Per head a (dim, width) matrix with orthonormal columns (seeded): ``[softmax(xW), softmax(-xW)]`` then
    gives 2 * width features that start out spread over every input direction."""
    g = torch.Generator().manual_seed(seed)
    mats = [torch.linalg.qr(torch.randn(dim, dim, generator=g))[0][:, :width] for _ in range(heads)]
    return torch.stack(mats)


def hedgehog_loss(wq: torch.Tensor, wk: torch.Tensor, data: list[FitRows], fractions, block_q: int,
                  block_k: int) -> torch.Tensor:
    """Mean over top-k fractions of the summed per-head relative squared error of the mixed output
    ``alpha O_s + (1 - alpha) O_hedgehog`` against the dense output, alpha per head in closed form over ``data``
    (the quantity the study reports, differentiable in the feature maps)."""
    sums = {f: [0.0, 0.0, 0.0] for f in fractions}  # a2, a1, a0 per fraction
    ref = 0.0
    for r in data:
        phi_q = te.hedgehog_features(r.q, wq)
        states = te.block_states(te.hedgehog_features(r.k, wk), r.v, block_k)  # shared by every fraction
        ref = ref + r.o.square().sum(dim=(0, 2, 3))
        for f in fractions:
            tail = te.kernel_tail(phi_q, None, None, r.luts[f], block_q, block_k, states=states)
            x, y = r.o_s[f] - tail, tail - r.o
            acc = sums[f]
            acc[0] = acc[0] + x.square().sum(dim=(0, 2, 3))
            acc[1] = acc[1] + (x * y).sum(dim=(0, 2, 3))
            acc[2] = acc[2] + y.square().sum(dim=(0, 2, 3))
    loss = 0.0
    for a2, a1, a0 in sums.values():
        alpha = te.least_squares_alpha(a2, a1)
        loss = loss + ((alpha.square() * a2 + 2 * alpha * a1 + a0) / ref).sum()
    return loss / len(fractions)


def train_hedgehog(data: list[FitRows], width: int, fractions, block_q: int, block_k: int, steps: int,
                   lr: float, seed: int = 0, stop_at: float | None = None) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Untied query and key feature maps (H, D, width) for one layer, by Adam on :func:`hedgehog_loss` over
    every sample in ``data`` at every step; returns them and the loss curve.

    ``stop_at`` (a ``time.monotonic()`` value) ends the fit early, after at least one step.
    """
    heads, dim = data[0].q.shape[1], data[0].q.shape[-1]
    wq = hedgehog_init(heads, dim, width, seed).to(data[0].q.device).requires_grad_(True)
    wk = wq.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([wq, wk], lr=lr)
    curve = []
    for _ in range(steps):
        if curve and stop_at is not None and time.monotonic() > stop_at:
            break
        opt.zero_grad()
        loss = hedgehog_loss(wq, wk, data, fractions, block_q, block_k)
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
    return wq.detach(), wk.detach(), curve
