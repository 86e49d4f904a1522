"""Stage 2 of calibration: end-to-end quantisation-aware fine-tuning.

Every model weight and alpha train with the router frozen and hard top-k, the sparse branch in the
recipe's low-bit mode (fake-quantised forward, straight-through backward on the reference path; the
fused kernel on GPU), against either the dense teacher's velocity (``distill``) or the
flow-matching target (``diffusion``).  It runs on every process of the launch: one, DDP or FSDP
from the accelerate config.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import torch

from .. import flow
from ..errors import InputError
from ..inputs import denoiser_forward
from ..install import sla2_processors
from ..progress import progress
from ..utils.devices import DTYPES
from ..workdir import WorkDir
from . import checkpoints
from .distributed import (
    full_model_state,
    full_training_state,
    is_fsdp,
    load_training_state,
    make_accelerator,
    peak_memory,
    reset_peak_memory,
)
from .heldout import heldout_loss, heldout_sampler
from .results import data_name, save_results
from .runs import begin_run
from .sampler import StepSampler
from .teacher import TeacherTargets, stage2_target


def lr_factor(step: int, *, warmup: int, steps: int, schedule: str) -> float:
    """The learning rate of (0-based) ``step`` over the recipe's ``lr``: linear warm-up over ``warmup`` steps,
    then 1 (``constant``) or a half cosine that reaches 0 one step past the last (``cosine``; diffusers'
    convention, so the last step still moves the weights)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _final_model(workdir: Path, state: dict, dtype: str, device, quant: str):
    """A fresh model in the recipe dtype (the modules diffusers keeps in fp32 stay fp32, as after
    ``convert``) holding the trained weights ``state``."""
    net, _, _ = WorkDir(workdir).load_model(dtype=dtype, device=device, quant=quant)
    net.load_state_dict(state)  # strict: copies each tensor into the parameter's own dtype
    return net.eval().requires_grad_(False)


def run_stage2(workdir: Path, recipe: dict, *, data_dir=None, resume=None, device="cpu", show_progress=True,
               overwrite=False) -> dict:
    """Stage 2 on every process of the launch (one, DDP or FSDP from the accelerate config): fine-tune
    the weights and alpha with the router frozen; the main process saves the best state the run reached, in
    the recipe dtype.  ``resume`` and ``overwrite``: see :func:`slaconv.calibrate.runs.plan_run`; a stage this
    run completed comes back as ``{"stage2": its summary, "skipped": "2"}``."""
    cfg, calibration = recipe.calibration.stage2, recipe.calibration
    if cfg.objective == "diffusion" and data_dir is None:
        raise InputError("stage 2 with objective 'diffusion' needs real data (--data DIR)")
    reset_peak_memory()
    accelerator = make_accelerator(device, cfg.grad_accum)
    device = accelerator.device
    work = WorkDir(workdir)
    start = begin_run(work, recipe, 2, accelerator, resume=resume, overwrite=overwrite)
    if start.completed is not None:
        return {"stage2": start.completed, "skipped": "2"}
    quant = cfg.quant or recipe.sla2.quant
    # fp32 master weights (bf16 autocast on GPU): lr-1e-5 updates would vanish in bf16 weights.  Under
    # FSDP every rank loads them on the CPU and FSDP moves only its shard to the GPU while wrapping,
    # so no GPU ever holds the whole fp32 model.
    load_device = "cpu" if is_fsdp(accelerator) else device
    model, family, _ = work.load_model(dtype="float32", device=load_device, quant=quant)
    model.train()
    model.requires_grad_(True)
    for proc in sla2_processors(model).values():
        proc.router_q.requires_grad_(False)
        proc.router_k.requires_grad_(False)
        proc.alpha_logit.requires_grad_(bool(cfg.train_alpha))
        if proc.alpha_weight is not None:  # alpha per query from the query: part of alpha
            proc.alpha_weight.requires_grad_(bool(cfg.train_alpha))
    if cfg.gradient_checkpointing and hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, warmup=cfg.warmup_steps, steps=cfg.steps, schedule=cfg.lr_schedule))
    model_config = work.read_model_config()
    sampler = StepSampler(family, model_config, recipe, cfg.batch_size, data_dir,
                          rank=accelerator.process_index, world=accelerator.num_processes)
    ckpt_root, log_path = work.checkpoints_dir(2), work.log_path(2)
    model, optimizer = accelerator.prepare(model, optimizer)
    if start.state is not None:
        load_training_state(model, optimizer, start.state["model"], start.state["optimizer"])
        scheduler.load_state_dict(start.state["scheduler"])
    dtype = torch.float32  # inputs of the fp32 master model (autocast runs the matmuls in bf16 on GPU)
    teacher_dtype = DTYPES[recipe.model.dtype]  # the teacher is loaded in the recipe dtype
    n_eval = calibration.eval_samples
    eval_sampler = heldout_sampler(family, model_config, recipe, data_dir)

    def forward(net, batch, x_t, sigma, student_dtype=dtype):
        return denoiser_forward(net, family, batch, x_t, sigma, device, student_dtype)

    targets = None
    show = show_progress and accelerator.is_main_process
    every = calibration.checkpoint_every
    ga = cfg.grad_accum
    if cfg.objective == "distill":
        targets = TeacherTargets(
            lambda net, b, x, sg: denoiser_forward(net, family, b, x, sg, device, teacher_dtype),
            lambda verify: work.load_base_model(dtype=recipe.model.dtype, device=device,
                                                verify=verify).requires_grad_(False),
            accelerator.autocast, device, cfg.teacher)

    def train_chunk(step):  # (precompute) the micro-batches up to the next checkpoint: one interval at a time
        return sampler, range(step * ga, min(cfg.steps, (step // every + 1) * every) * ga)

    if targets is not None:
        targets.precompute({"eval": (eval_sampler, range(n_eval)), "train": train_chunk(start.step)}, show)

    def score(net, student_dtype=dtype):  # under FSDP a forward is a collective: every rank calls this
        def run(n, b, x, s):
            return forward(n, b, x, s, student_dtype)

        return heldout_loss(run, net, targets, eval_sampler, n_eval, device, accelerator.autocast)

    measured = start.progress
    if start.step == 0:
        measured.before = score(model)
    diverged, done = None, start.step
    bar = progress(range(start.step, cfg.steps), desc="stage 2",
                   enabled=show_progress and accelerator.is_main_process, initial=start.step, total=cfg.steps)
    t0 = time.time()
    for step in bar:
        if targets is not None and step != start.step and step % every == 0:
            targets.precompute({"train": train_chunk(step)}, show)
        t_step = time.time()
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            index = step * cfg.grad_accum + micro
            batch = sampler.batch(index)
            x_t = flow.add_noise(batch["latents"], batch["noise"], batch["sigma"])
            target = stage2_target(targets, "train", index, batch, device)
            with accelerator.accumulate(model), accelerator.autocast():
                pred = forward(model, batch, x_t, batch["sigma"]).float()
                loss = torch.mean((pred - target) ** 2)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.grad_clip:
                    # all of the prepared model's parameters (frozen ones have no gradient): accelerate
                    # computes FSDP's global norm over the shards only when given exactly these
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += float(loss.detach()) / cfg.grad_accum
        lr_used = scheduler.get_last_lr()[0]
        scheduler.step()
        step_loss = float(accelerator.reduce(torch.tensor(step_loss, device=device), reduction="mean"))
        done = step + 1  # the weights in memory are this step's, finite or not
        if not math.isfinite(step_loss):
            diverged = f"the stage-2 loss became {step_loss} at step {done}"
            break
        record = {"step": done, "loss": step_loss, "lr": lr_used,
                  "seconds": round(time.time() - t_step, 3)}
        diverged = start.end_step(record, calibration, cfg.steps, functools.partial(score, model), log_path,
                                  accelerator.is_main_process)
        bar.set_postfix(loss=f"{step_loss:.5f}")
        if diverged:
            break
        if done % every == 0 and done < cfg.steps:
            accelerator.wait_for_everyone()
            model_state, optim_state = full_training_state(accelerator, model, optimizer)  # every rank
            if accelerator.is_main_process:
                state = {"stage": 2, "model": model_state, "optimizer": optim_state,
                         "scheduler": scheduler.state_dict(), "run": start.checkpoint_meta(time.time() - t0)}
                checkpoints.save_checkpoint(ckpt_root, done, state, calibration.checkpoints_total_limit,
                                            start.run_id, keep=measured.best_step)
            del model_state, optim_state
    accelerator.wait_for_everyone()
    seconds = time.time() - t0
    kept = measured.kept_step(2, done, calibration.heldout_tolerance, diverged)  # every rank: all raise alike
    training_peak = peak_memory(accelerator).get("peak_gpu_memory_gb_per_rank")  # before the main process's save
    full_state = full_model_state(accelerator, model)  # every rank; under FSDP it gathers the shards
    del model, optimizer, scheduler
    accelerator.free_memory()
    net, heldout_after = None, None
    if accelerator.is_main_process:
        kept_state = full_state if kept == done else start.kept_state(kept)["model"]
        net = _final_model(workdir, kept_state, recipe.model.dtype, device, quant)
        heldout_after = score(net, DTYPES[recipe.model.dtype])  # as saved: weights in the recipe dtype
        del kept_state
    del full_state
    first_last = checkpoints.first_last_loss(log_path)
    summary = {"stage2": {"steps": cfg.steps, "objective": cfg.objective, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule,
                          "teacher": cfg.teacher if cfg.objective == "distill" else None,
                          "heldout_loss_before": measured.before, "heldout_loss_after": heldout_after,
                          "quant": quant, "batch_size": cfg.batch_size,
                          "grad_accum": cfg.grad_accum, "processes": accelerator.num_processes,
                          "distributed": accelerator.distributed_type.value,
                          **start.summary(kept, seconds), "diverged": diverged, "loss_first": first_last[0],
                          "loss_last": first_last[1], "data": data_name(data_dir), **peak_memory(accelerator)}}
    if training_peak is not None:
        summary["stage2"]["peak_gpu_memory_gb_per_rank_training"] = training_peak
    if accelerator.is_main_process:
        save_results(net, family, workdir, summary)
    accelerator.wait_for_everyone()
    return summary
