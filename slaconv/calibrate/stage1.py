"""Stage 1 of calibration: train each layer's router and alpha (and hedgehog feature weights) against full
attention.

The frozen model runs on calibration inputs at sampled noise levels with dense attention, and every
target layer, as the forward reaches it, computes its own loss -- the MSE between full attention
and SLA2 with SoftTop-k on a random subset of query blocks -- and back-propagates it into its
router and alpha at once.  Nothing is stored across layers, so memory is one layer's worth whatever
the model depth.  Stage 1 runs the bf16/fp32 math, not the low-bit forward: the router learns a
ranking, which quantisation noise would only blur.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .. import flow
from ..inputs import denoiser_forward
from ..install import sla2_processors
from ..kernels import reference
from ..observe import observing
from ..progress import progress
from ..utils.devices import DTYPES
from ..workdir import WorkDir
from . import checkpoints
from .distributed import (
    make_accelerator,
    mean_over_processes,
    peak_memory,
    reset_peak_memory,
)
from .heldout import heldout_attention_error, heldout_sampler
from .results import data_name, save_results
from .runs import begin_run
from .sampler import StepSampler


def run_stage1(workdir: Path, recipe: dict, *, data_dir=None, resume=None, device="cpu", show_progress=True,
               overwrite=False) -> dict:
    """Stage 1 on every process of the launch (data-parallel): train the routers and alphas of the
    frozen model; the main process saves the best state the run reached.  ``resume`` and ``overwrite``: see
    :func:`slaconv.calibrate.runs.plan_run`; a stage this run completed comes back as ``{"stage1": its
    summary, "skipped": "1"}``."""
    cfg, calibration = recipe.calibration.stage1, recipe.calibration
    reset_peak_memory()
    accelerator = make_accelerator(device)
    device = accelerator.device
    work = WorkDir(workdir)
    start = begin_run(work, recipe, 1, accelerator, resume=resume, overwrite=overwrite)
    if start.completed is not None:
        return {"stage1": start.completed, "skipped": "1"}
    model, family, _ = work.load_model(dtype=recipe.model.dtype, device=device)
    model.requires_grad_(False)
    procs = sla2_processors(model)
    params = []
    for proc in procs.values():
        for p in proc.sla2_state().values():
            p.requires_grad_(True)
            params.append(p)
    routers = [p for proc in procs.values() for p in (proc.router_q, proc.router_k)]
    alphas = [p for proc in procs.values() for p in (proc.alpha_logit, proc.alpha_weight) if p is not None]
    features = [p for proc in procs.values() if proc.feature_q is not None for p in (proc.feature_q, proc.feature_k)]
    groups = [{"params": routers, "lr": cfg.lr}, {"params": alphas, "lr": cfg.alpha_lr}]
    if features:
        groups.append({"params": features, "lr": cfg.feature_lr})
    optimizer = torch.optim.Adam(groups)
    model_config = work.read_model_config()
    sampler = StepSampler(family, model_config, recipe, cfg.batch_size, data_dir,
                          rank=accelerator.process_index, world=accelerator.num_processes)
    ckpt_root, log_path = work.checkpoints_dir(1), work.log_path(1)

    def load_sla2(state: dict) -> None:
        with torch.no_grad():
            for key, value in state["sla2"].items():
                name, tensor = key.rsplit(".", 1)
                getattr(procs[name], tensor).copy_(value)

    if start.state is not None:
        load_sla2(start.state)
        optimizer.load_state_dict(start.state["optimizer"])

    tau, n_qb = cfg.tau, cfg.query_blocks_per_step
    errors: dict[str, float] = {}
    step_gen = {"gen": None}

    def observe(proc, q, k, v):
        qh, kh, vh = (t.detach().transpose(1, 2) for t in (q, k, v))
        nq = reference.block_count(qh.shape[2], proc.block_q)
        blocks = torch.randperm(nq, generator=step_gen["gen"])[:n_qb].sort().values.to(qh.device)
        rows = (blocks.view(-1, 1) * proc.block_q + torch.arange(proc.block_q, device=qh.device)).view(-1)
        rows = rows[rows < qh.shape[2]]
        with torch.enable_grad():
            target = reference.full_attention_reference(qh.float(), kh.float(), vh.float(), rows)
            pred = proc.sparse_attention(*(t.detach().float() for t in (q, k, v)), quant="none", soft_tau=tau,
                                         q_blocks=blocks).transpose(1, 2)
            loss = torch.mean((pred - target) ** 2)
            loss.backward()
        # the relative error's numerator and denominator apart: averaged over processes separately, their
        # ratio is the one a single process with the whole global batch computes
        errors[f"{proc.layer_name}\0error"] = float(loss)
        errors[f"{proc.layer_name}\0target"] = float(torch.mean(target ** 2))
        return proc.dense_attention(q, k, v)

    dtype = DTYPES[recipe.model.dtype]
    eval_sampler = heldout_sampler(family, model_config, recipe, data_dir)

    def evaluate():
        return heldout_attention_error(model, family, eval_sampler, calibration.eval_samples, n_qb, device, dtype)

    measured = start.progress
    if start.step == 0:
        measured.before = evaluate()
    diverged, done = None, start.step
    bar = progress(range(start.step, cfg.steps), desc="stage 1",
                   enabled=show_progress and accelerator.is_main_process, initial=start.step, total=cfg.steps)
    t0 = time.time()
    for step in bar:
        t_step = time.time()
        batch = sampler.batch(step)
        step_gen["gen"] = sampler.generator(step, salt=1)
        x_t = flow.add_noise(batch["latents"], batch["noise"], batch["sigma"])
        errors.clear()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad(), observing(procs.values(), observe):
            denoiser_forward(model, family, batch, x_t, batch["sigma"], device, dtype)
        means = mean_over_processes(accelerator, errors)
        layer_losses = {name: means[f"{name}\0error"] / max(means[f"{name}\0target"], 1e-12) for name in procs}
        mean_loss = sum(layer_losses.values()) / len(layer_losses)
        if not math.isfinite(mean_loss):
            diverged = f"the stage-1 loss became {mean_loss} at step {step + 1}"
            break
        if accelerator.num_processes > 1:  # data-parallel: average the router/alpha gradients
            for p in params:
                p.grad = accelerator.reduce(p.grad, reduction="mean")
        optimizer.step()
        done = step + 1
        record = {"step": done, "loss_rel_mse_mean": mean_loss, "seconds": round(time.time() - t_step, 3),
                  "layers": {k: round(v, 6) for k, v in layer_losses.items()}}
        diverged = start.end_step(record, calibration, cfg.steps, evaluate, log_path, accelerator.is_main_process)
        bar.set_postfix(rel_mse=f"{mean_loss:.4f}")
        if diverged:
            break
        if done % calibration.checkpoint_every == 0 and done < cfg.steps and accelerator.is_main_process:
            checkpoints.save_checkpoint(ckpt_root, done, {
                "stage": 1, "sla2": {f"{n}.{t}": v.detach().cpu().clone()
                                     for n, p in procs.items() for t, v in p.sla2_state().items()},
                "optimizer": optimizer.state_dict(), "run": start.checkpoint_meta(time.time() - t0)},
                calibration.checkpoints_total_limit, start.run_id, keep=measured.best_step)
    seconds = time.time() - t0
    kept = measured.kept_step(1, done, calibration.heldout_tolerance, diverged)
    if kept != done:
        load_sla2(start.kept_state(kept))
    first_last = checkpoints.first_last_loss(log_path)
    summary = {"stage1": {"steps": cfg.steps, "tau": tau, "lr": cfg.lr, "alpha_lr": cfg.alpha_lr,
                          **({"feature_lr": cfg.feature_lr} if features else {}),
                          **start.summary(kept, seconds), "rel_mse_first": first_last[0],
                          "rel_mse_last": first_last[1], "heldout_attention_rel_mse_before": measured.before,
                          "heldout_attention_rel_mse_after": measured.score_of(kept),
                          "diverged": diverged, "data": data_name(data_dir), **peak_memory(accelerator)}}
    for p in params:
        p.requires_grad_(False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_results(model, family, workdir, summary)
    accelerator.wait_for_everyone()
    return summary
