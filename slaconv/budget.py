"""How many key blocks each converted layer attends to exactly: the sparsity budget.

``sla2.budget: uniform`` gives every layer the recipe's ``topk``.  ``per_layer`` spends the same total number
of key blocks unevenly: each block goes to the layer where it holds the most attention mass.  The statistic is the
*oracle block mass curve* of each layer, measured at convert time on calibration samples with dense attention:
for every query block, the full-attention probability mass that its ``c`` heaviest key blocks hold, averaged
over the sampled query blocks, heads and samples, for ``c = 0 .. m`` (``m`` key blocks outside the always-kept
range).  Each curve is concave (a row's blocks are summed in decreasing order, and an average of concave curves
is concave), so greedily handing the next block to the layer whose mass gains most from it maximises the total
mass the sparse branches keep for the given number of blocks.  Which layers that favours depends on the budget:
a layer whose first few blocks hold most of its mass gains little from more, a layer whose mass is spread evenly
gains 1/m per block, and a layer in between gains most from its next blocks.  ``per_layer_tail`` instead gives
each layer blocks in proportion to the mass its uniform count leaves unselected: the more diffuse a layer, the
more blocks, whatever they hold (it keeps less mass in all than greedy, by construction; it is the rule to
test the hypothesis that diffuse layers need more).  The allocation is stored as
``topk_per_layer`` (what the processors and kernels run with) and, with the curves' values at the chosen and at
the uniform counts, as the work dir's ``budget`` record.
"""

from __future__ import annotations

import heapq
import math

import torch

from . import flow
from .inputs import batches, denoiser_forward
from .kernels import reference
from .observe import observing
from .recipe import Recipe
from .utils.devices import DTYPES

STATISTIC = "oracle top-k block mass"
"""What the ``per_layer`` allocation maximises (the module docstring says how it is measured)."""
BUDGET_SIGMAS = (0.25, 0.5, 0.75)
"""Noise levels of the calibration samples the mass curves are measured on (one forward each)."""
QUERY_BLOCKS_SAMPLED = 16
"""Query blocks per head and sample whose rows are scored (all of them when a layer has fewer)."""


def block_mass_curve(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int,
                     always_kept: tuple[int, int] = (0, 0), query_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Oracle mass curve of one attention call on (B, H, N, D) ``q`` and ``k``: a (m + 1,) fp32 tensor whose entry
    ``c`` is the mean over batch, heads and (the given) query blocks of the dense-attention mass held by the
    ``c`` heaviest key blocks outside the ``always_kept`` range (entry 0 is 0)."""
    b, h, n, d = q.shape
    nq, nk = reference.block_count(n, block_q), reference.block_count(k.shape[2], block_k)
    reference.check_always_kept(always_kept, nk)
    blocks = torch.arange(nq) if query_blocks is None else query_blocks.cpu()
    rows = (blocks.view(-1, 1) * block_q + torch.arange(block_q)).view(-1)
    rows = rows[rows < n].to(q.device)
    s = (q[:, :, rows].float() @ k.float().transpose(-1, -2)) / math.sqrt(d)
    p = torch.softmax(s, dim=-1)  # (B, H, rows, Nk)
    pad = nk * block_k - p.shape[-1]
    p = torch.nn.functional.pad(p, (0, pad)).view(b, h, len(rows), nk, block_k).sum(-1)  # mass per key block
    q_of_row = torch.div(rows, block_q, rounding_mode="floor")
    _, q_index = torch.unique(q_of_row, return_inverse=True)
    n_sel = int(q_index.max()) + 1
    pooled = torch.zeros(b, h, n_sel, nk, device=p.device).index_add_(2, q_index, p)
    pooled = pooled / torch.bincount(q_index, minlength=n_sel).to(p.device).view(1, 1, -1, 1)
    start, end = always_kept
    others = torch.cat([pooled[..., :start], pooled[..., end:]], dim=-1)
    ranked = others.sort(dim=-1, descending=True).values.cumsum(dim=-1).mean(dim=(0, 1, 2))
    return torch.cat([ranked.new_zeros(1), ranked]).cpu()


def allocate_blocks(curves: dict[str, torch.Tensor], total: int) -> dict[str, int]:
    """Key blocks per layer, at least 1 and at most ``len(curve) - 1`` each, ``total`` in all, chosen greedily by
    the mass the next block adds (ties go to the earlier layer): optimal for concave ``curves``."""
    names = list(curves)
    limits = {name: len(curves[name]) - 1 for name in names}
    if not len(names) <= total <= sum(limits.values()):
        raise ValueError(f"cannot spend {total} key blocks on {len(names)} layers "
                         f"(1 to {sum(limits.values())} in all)")
    counts = dict.fromkeys(names, 1)

    def gain(name: str) -> float:
        c = counts[name]
        return float(curves[name][c + 1] - curves[name][c])

    heap = [(-gain(name), i, name) for i, name in enumerate(names) if limits[name] > 1]
    heapq.heapify(heap)
    for _ in range(total - len(names)):
        _, i, name = heapq.heappop(heap)
        counts[name] += 1
        if counts[name] < limits[name]:
            heapq.heappush(heap, (-gain(name), i, name))
    return counts


@torch.no_grad()
def measure_mass_curves(model, family, procs: dict, model_config: dict, recipe: Recipe, data_dir=None,
                        device="cpu") -> dict[str, torch.Tensor]:
    """Every layer's oracle mass curve (:func:`block_mass_curve`), averaged over one calibration sample at each
    of :data:`BUDGET_SIGMAS`; the model runs dense attention throughout."""
    gen = torch.Generator().manual_seed(recipe.calibration.seed + 1)
    stream = batches(family, model_config, recipe.data, 1, gen, data_dir)
    dtype = DTYPES[recipe.model.dtype]
    sums: dict[str, torch.Tensor] = {}

    def observe(proc, q, k, v):
        qh, kh = q.transpose(1, 2), k.transpose(1, 2)
        nq = reference.block_count(qh.shape[2], proc.block_q)
        picked = torch.randperm(nq, generator=gen)[:QUERY_BLOCKS_SAMPLED].sort().values
        curve = block_mass_curve(qh, kh, proc.block_q, proc.block_k, proc.always_kept(), picked)
        sums[proc.layer_name] = sums.get(proc.layer_name, 0) + curve
        return proc.dense_attention(q, k, v)

    with observing(procs.values(), observe):
        for sigma in BUDGET_SIGMAS:
            batch = next(stream)
            noise = torch.randn(batch["latents"].shape, generator=gen)
            s = torch.full((1,), sigma)
            denoiser_forward(model, family, batch, flow.add_noise(batch["latents"], noise, s), s, device, dtype)
    return {name: sums[name] / len(BUDGET_SIGMAS) for name in procs}


def tail_proportional_blocks(curves: dict[str, torch.Tensor], uniform: dict[str, int]) -> dict[str, int]:
    """Key blocks per layer in proportion to the mass its ``uniform`` count leaves unselected (``1 - curve``),
    rounded to the uniform total by handing the remaining blocks to the largest shortfalls, each within 1 ..
    ``len(curve) - 1``: the more diffuse a layer's attention, the more blocks."""
    total = sum(uniform.values())
    tails = {name: max(1.0 - float(c[uniform[name]]), 1e-9) for name, c in curves.items()}
    shares = {name: total * t / sum(tails.values()) for name, t in tails.items()}
    limits = {name: len(c) - 1 for name, c in curves.items()}
    counts = {name: min(max(int(share), 1), limits[name]) for name, share in shares.items()}
    while sum(counts.values()) != total:  # one block at a time: to the largest shortfall, or from the largest excess
        step = 1 if sum(counts.values()) < total else -1
        movable = [n for n in curves if 1 <= counts[n] + step <= limits[n]]
        name = max(movable, key=lambda n: step * (shares[n] - counts[n]))
        counts[name] += step
    return counts


ALLOCATIONS = {
    "per_layer": (STATISTIC + ", greedy marginal mass", lambda curves, uniform: allocate_blocks(
        curves, sum(uniform.values()))),
    "per_layer_tail": ("unselected oracle mass at the uniform count, blocks in proportion", tail_proportional_blocks),
}
"""``sla2.budget`` values other than ``uniform``: (what the allocation follows, the allocation)."""


def per_layer_budget(curves: dict[str, torch.Tensor], topk: float,
                     method: str = "per_layer") -> tuple[dict[str, float], dict]:
    """(``topk_per_layer`` fractions, the work dir's ``budget`` record) for the allocation ``method`` (a key of
    :data:`ALLOCATIONS`) of the blocks ``topk`` gives every layer.  A layer's fraction is its count over its
    ``m`` allocatable blocks, which :func:`slaconv.kernels.reference.topk_count` turns back into the count
    exactly."""
    uniform = {name: reference.topk_count(topk, len(c) - 1) for name, c in curves.items()}
    statistic, allocate = ALLOCATIONS[method]
    counts = allocate(curves, uniform)
    fractions = {name: counts[name] / (len(curves[name]) - 1) for name in curves}
    record = {
        "method": method, "statistic": statistic, "sigmas": list(BUDGET_SIGMAS),
        "layers": {name: {"blocks": counts[name], "uniform_blocks": uniform[name], "key_blocks": len(c) - 1,
                          "mass_uniform": round(float(c[uniform[name]]), 4),
                          "mass_allocated": round(float(c[counts[name]]), 4)}
                   for name, c in curves.items()},
    }
    return fractions, record
