"""Scores on fixed held-out samples, before and after a stage: stage 1's attention error, stage 2's loss."""

from __future__ import annotations

import torch

from .. import flow
from ..inputs import denoiser_forward
from ..kernels import reference
from ..observe import observe_attention
from .sampler import StepSampler
from .teacher import TeacherTargets, stage2_target


def heldout_sampler(family, model_config, recipe, data_dir) -> StepSampler:
    """The sampler of the held-out scores: one sample per batch, from a seed of its own (the recipe's
    seed + 7777)."""
    held = recipe.override({"calibration.seed": recipe.calibration.seed + 7_777})
    return StepSampler(family, model_config, held, 1, data_dir)


@torch.no_grad()
def heldout_attention_error(model, family, sampler: StepSampler, n: int, n_query_blocks: int, device,
                            dtype) -> float | None:
    """Mean over layers of the relative MSE of hard-top-k SLA2 (as run at inference, bf16 math)
    against full attention, on ``n`` fixed held-out samples and evenly spaced query blocks."""
    if n == 0:
        return None
    err: dict[str, list[float]] = {}

    def observe(proc, q, k, v):
        qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))
        nq = reference.block_count(qh.shape[2], proc.block_q)
        blocks = torch.linspace(0, nq - 1, min(n_query_blocks, nq)).round().long().unique().to(qh.device)
        rows = (blocks.view(-1, 1) * proc.block_q + torch.arange(proc.block_q, device=qh.device)).view(-1)
        rows = rows[rows < qh.shape[2]]
        target = reference.full_attention_reference(qh, kh, vh, rows)
        pred = proc.sparse_attention(q.float(), k.float(), v.float(), quant="none", q_blocks=blocks).transpose(1, 2)
        e = err.setdefault(proc.layer_name, [0.0, 0.0])
        e[0] += float(((pred - target) ** 2).sum())
        e[1] += float((target ** 2).sum())
        return proc.dense_attention(q, k, v)

    with observe_attention(model, observe):
        for i in range(n):
            batch = sampler.batch(i)
            x_t = flow.add_noise(batch["latents"], batch["noise"], batch["sigma"])
            denoiser_forward(model, family, batch, x_t, batch["sigma"], device, dtype)
    return sum(a / max(b, 1e-30) for a, b in err.values()) / len(err)


@torch.no_grad()
def heldout_loss(forward, model, targets: TeacherTargets | None, sampler: StepSampler, n: int, device,
                 autocast) -> float | None:
    """Stage-2 objective on ``n`` fixed held-out samples (distillation if ``targets`` else flow
    matching); ``forward(net, batch, x_t, sigma)`` runs one network."""
    if n == 0:
        return None
    total = 0.0
    for i in range(n):
        batch = sampler.batch(i)
        x_t = flow.add_noise(batch["latents"], batch["noise"], batch["sigma"])
        with autocast():
            pred = forward(model, batch, x_t, batch["sigma"]).float()
        target = stage2_target(targets, "eval", i, batch, device)
        total += float(torch.mean((pred - target) ** 2))
    return total / n
