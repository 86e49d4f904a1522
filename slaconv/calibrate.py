"""``slaconv calibrate``: stage 1 (router + alpha) then stage 2 (end-to-end QAT fine-tune).

Stage 1 streams: the frozen model runs on calibration inputs at sampled noise levels with dense
attention, and every target layer, as the forward reaches it, computes its own loss -- the MSE
between full attention and SLA2 with SoftTop-k on a random subset of query blocks -- and back-
propagates it into its router and alpha at once.  Nothing is stored across layers, so memory is
one layer's worth whatever the model depth.  Stage 1 runs the bf16/fp32 math, not the low-bit
forward: the router learns a ranking, which quantisation noise would only blur.

Stage 2 fine-tunes every model weight and alpha with the router frozen and hard top-k, the
sparse branch in the recipe's low-bit mode (fake-quantised forward, straight-through backward on
the reference path; the fused kernel on GPU), against either the dense teacher's velocity
(``distill``) or the flow-matching target (``diffusion``).

Every step's randomness is a function of (seed, step), so a resumed run replays exactly the
batches, noise and timesteps of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch

from . import flow
from .errors import DivergedError, InputError, OutOfMemoryError, UsageError
from .inputs import check_latent_shape, denoiser_forward
from .install import sla2_processors
from .kernels import reference
from .progress import progress
from .statefile import load_state, save_state
from .utils.devices import DTYPES
from .utils.files import atomic_dir
from .workdir import WorkDir

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)$")


class StepSampler:
    """Deterministic batches: every sample, its noise and its noise level are functions of
    (seed, global sample index) alone.

    Process ``rank`` of ``world`` takes samples ``step * B * world + rank * B + j``, so a run on N
    processes with per-process batch B sees exactly the samples of a one-process run with batch
    N * B, and a resumed run sees exactly those of an uninterrupted one.
    """

    def __init__(self, family, model_config, recipe, batch_size, data_dir=None, rank=0, world=1):
        self.family, self.model_config, self.recipe = family, model_config, recipe
        self.batch_size, self.seed, self.rank, self.world = batch_size, recipe.calibration.seed, rank, world
        self.shift = recipe.calibration.stage2.timestep_shift
        self.dataset = None
        if data_dir is not None:
            from .data import CalibrationDataset

            self.dataset = CalibrationDataset(data_dir, expected_channels=family.latent_channels(model_config),
                                              expected_text_dim=family.text_dim(model_config))
            check_latent_shape(family, model_config, *self.dataset.latent_shape[1:], where=str(data_dir))
        else:
            d = recipe.data
            check_latent_shape(family, model_config, d.frames, d.height, d.width, where="recipe data")

    def generator(self, step: int, salt: int = 0) -> torch.Generator:
        """A generator for per-step choices shared by all processes (e.g. stage-1 query blocks)."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step * 7919 + salt * 104_729) % (2**63))

    def _sample(self, index: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed((self.seed * 2_654_435_761 + index * 40_503 + 17) % (2**63))
        if self.dataset is None:
            from .inputs import synthetic_batch

            item = {k: v[0] for k, v in synthetic_batch(self.family, self.model_config, self.recipe.data, 1, gen).items()}
        else:
            n = len(self.dataset)
            epoch_order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 31 * (index // n)))
            item = dict(self.dataset[int(epoch_order[index % n])])
        item["noise"] = torch.randn(item["latents"].shape, generator=gen)
        item["sigma"] = flow.sample_sigmas(1, self.shift, gen, "cpu")[0]
        return item

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        first = (step * self.world + self.rank) * self.batch_size
        items = [self._sample(first + j) for j in range(self.batch_size)]
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}


# ---------------------------------------------------------------- checkpoints


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and (p / "COMPLETE").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(root: Path, step: int, state: dict, limit: int) -> Path:
    """Write ``checkpoint-<step>/`` atomically (a ``COMPLETE`` marker last), then prune old ones."""
    final = root / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        save_state(tmp, state)
        (tmp / "COMPLETE").write_text(f"{step}\n")
    for _, old in list_checkpoints(root)[:-limit]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(root: Path, resume: str) -> tuple[int, dict] | None:
    if resume == "latest":
        found = list_checkpoints(root)
        if not found:
            return None
        step, path = found[-1]
    else:
        path = Path(resume)
        if not (path / "COMPLETE").is_file():
            raise InputError(f"{path} is not a complete checkpoint")
        step = int(CHECKPOINT_RE.match(path.name).group(1)) if CHECKPOINT_RE.match(path.name) else 0
    return step, load_state(path)


# ---------------------------------------------------------------- saving results


def save_results(model, family, workdir: Path, update: dict) -> None:
    """Replace the work dir's weights, then its config (written last: it marks completion)."""
    workdir = Path(workdir)
    staging = workdir / f".staging-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        WorkDir(staging).save_model(model, family)
        new_files = {p.name for p in staging.iterdir()}
        for old in workdir.glob("diffusion_pytorch_model*"):
            if old.name not in new_files:
                old.unlink()
        for p in staging.iterdir():
            if p.name != "config.json":
                os.replace(p, workdir / p.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    work = WorkDir(workdir)
    calibration = dict(work.read_sla2_config().calibration or {})
    calibration.update(update)
    work.update_sla2_config(calibration=calibration)


def _append_log(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _check_finite(value: float, what: str, ckpt_root: Path) -> None:
    if not math.isfinite(value):
        found = list_checkpoints(ckpt_root)
        kept = f"; last good checkpoint: {found[-1][1]}" if found else "; no checkpoint was written yet"
        raise DivergedError(f"{what} became {value}{kept} (lower the learning rate)")


def _oom(stage: str) -> OutOfMemoryError:
    return OutOfMemoryError(
        f"out of memory in stage {stage}: lower calibration.{'stage1.query_blocks_per_step' if stage == '1' else 'stage2.batch_size'}"
        ", enable calibration.stage2.gradient_checkpointing, or use a smaller data resolution"
    )


# ---------------------------------------------------------------- held-out scores


def _eval_sampler(family, model_config, recipe, data_dir) -> StepSampler:
    held = recipe.override({"calibration.seed": recipe.calibration.seed + 7_777})
    return StepSampler(family, model_config, held, 1, data_dir)


@torch.no_grad()
def heldout_attention_error(model, family, sampler: StepSampler, n: int, n_query_blocks: int, device, dtype) -> float | None:
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
        pred = reference.sla2_attention_reference(qh, kh, vh, proc.router_q, proc.router_k, proc.alpha_logit,
                                                  topk=proc.topk, block_q=proc.block_q, block_k=proc.block_k,
                                                  q_blocks=blocks)
        e = err.setdefault(proc.layer_name, [0.0, 0.0])
        e[0] += float(((pred - target) ** 2).sum())
        e[1] += float((target ** 2).sum())
        return proc.dense_attention(q, k, v)

    procs = sla2_processors(model)
    for proc in procs.values():
        proc.observer = observe
    try:
        for i in range(n):
            batch = sampler.batch(i)
            x_t = flow.add_noise(batch["latents"], batch["noise"], batch["sigma"])
            denoiser_forward(model, family, batch, x_t, batch["sigma"], device, dtype)
    finally:
        for proc in procs.values():
            proc.observer = None
    return sum(a / max(b, 1e-30) for a, b in err.values()) / len(err)


class TeacherTargets:
    """The distillation targets (the dense teacher's velocity) of stage 2, by sampler and batch index.

    ``online``: the teacher stays on the device and runs beside the student at every step.
    ``precompute``: before each checkpoint interval the teacher is loaded, computes the targets of that
    interval's micro-batches (and, once, of the held-out samples), which are kept on the host, and is
    freed again; so its weights (28.6 GB in bf16 for a 14B model, whole on every rank under FSDP) never
    share the device with the student's gradients and optimizer state, and host memory holds one
    interval's targets.  Batches are functions of (seed, index) alone, so both modes give the same numbers.
    """

    def __init__(self, run, load_teacher, autocast, device, mode: str):
        """``run(teacher, batch, x_t, sigma)`` is one teacher forward; ``load_teacher(verify)`` loads it."""
        self.run, self.load_teacher, self.autocast, self.device, self.mode = run, load_teacher, autocast, device, mode
        self.teacher = load_teacher(True) if mode == "online" else None
        self.loads = 0  # the first load checks the base model's content hash, the later ones need not
        self.stored: dict[tuple[str, int], torch.Tensor] = {}

    @torch.no_grad()
    def _target(self, batch) -> torch.Tensor:
        x_t = flow.add_noise(batch["latents"], batch["noise"], batch["sigma"])
        with self.autocast():
            return self.run(self.teacher, batch, x_t, batch["sigma"])

    def precompute(self, work: dict, show_progress: bool) -> None:
        """(precompute mode) For each ``name: (sampler, indices)`` of ``work``, replace the stored ``name``
        targets by those of ``indices``; the teacher is loaded for this and freed after."""
        if self.mode != "precompute":
            return
        self.stored = {key: t for key, t in self.stored.items() if key[0] not in work}
        todo = [(name, sampler, i) for name, (sampler, indices) in work.items() for i in indices]
        self.teacher = self.load_teacher(self.loads == 0)
        self.loads += 1
        try:
            for name, sampler, i in progress(todo, desc="stage 2 teacher targets", enabled=show_progress):
                self.stored[name, i] = self._target(sampler.batch(i)).cpu()
        finally:
            self.teacher = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def get(self, name: str, index: int, batch) -> torch.Tensor:
        """The fp32 target of ``batch``, index ``index`` of the ``name`` sampler, on the device."""
        if self.mode == "precompute":
            return self.stored[name, index].to(self.device).float()
        return self._target(batch).float()


def stage2_target(targets: "TeacherTargets | None", name: str, index: int, batch, device) -> torch.Tensor:
    """The fp32 stage-2 target of a batch: the teacher's velocity (distill) or flow matching's (diffusion)."""
    if targets is not None:
        return targets.get(name, index, batch)
    return flow.velocity_target(batch["latents"], batch["noise"]).to(device).float()


@torch.no_grad()
def heldout_loss(forward, model, targets: "TeacherTargets | None", sampler: StepSampler, n: int, device,
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


# ---------------------------------------------------------------- stage 1


def run_stage1(workdir: Path, recipe: dict, *, data_dir=None, resume=None, device="cpu", show_progress=True) -> dict:
    cfg = recipe.calibration.stage1
    _reset_peak_memory()
    accelerator = _accelerator(device)
    device = accelerator.device
    model, family, sla2_cfg = WorkDir(workdir).load_model(dtype=recipe.model.dtype, device=device)
    model.requires_grad_(False)
    procs = sla2_processors(model)
    params = []
    for proc in procs.values():
        for p in proc.sla2_state().values():
            p.requires_grad_(True)
            params.append(p)
    routers = [p for proc in procs.values() for p in (proc.router_q, proc.router_k)]
    alphas = [proc.alpha_logit for proc in procs.values()]
    optimizer = torch.optim.Adam([{"params": routers, "lr": cfg.lr}, {"params": alphas, "lr": cfg.alpha_lr}])
    model_config = WorkDir(workdir).read_model_config()
    sampler = StepSampler(family, model_config, recipe, cfg.batch_size, data_dir,
                          rank=accelerator.process_index, world=accelerator.num_processes)
    ckpt_root = WorkDir(workdir).checkpoints_dir(1)
    log_path = WorkDir(workdir).log_path(1)
    start = 0
    if resume:
        loaded = load_checkpoint(ckpt_root, resume)
        if loaded is not None:
            start, state = loaded
            with torch.no_grad():
                for key, value in state["sla2"].items():
                    name, tensor = key.rsplit(".", 1)
                    getattr(procs[name], tensor).copy_(value)
            optimizer.load_state_dict(state["optimizer"])
    if accelerator.is_main_process:
        if start == 0 and log_path.exists():
            log_path.unlink()
        else:
            _truncate_log(log_path, start)

    tau, n_qb = cfg.tau, cfg.query_blocks_per_step
    losses: dict[str, float] = {}
    step_gen = {"gen": None}

    def observe(proc, q, k, v):
        qh, kh, vh = (t.detach().transpose(1, 2) for t in (q, k, v))
        nq = reference.block_count(qh.shape[2], proc.block_q)
        blocks = torch.randperm(nq, generator=step_gen["gen"])[:n_qb].sort().values.to(qh.device)
        rows = (blocks.view(-1, 1) * proc.block_q + torch.arange(proc.block_q, device=qh.device)).view(-1)
        rows = rows[rows < qh.shape[2]]
        with torch.enable_grad():
            target = reference.full_attention_reference(qh.float(), kh.float(), vh.float(), rows)
            pred = reference.sla2_attention_reference(
                qh.float(), kh.float(), vh.float(), proc.router_q, proc.router_k, proc.alpha_logit,
                topk=proc.topk, block_q=proc.block_q, block_k=proc.block_k, soft_tau=tau, q_blocks=blocks)
            loss = torch.mean((pred - target) ** 2)
            loss.backward()
        losses[proc.layer_name] = float(loss) / max(float(torch.mean(target ** 2)), 1e-12)
        return proc.dense_attention(q, k, v)

    dtype = DTYPES[recipe.model.dtype]
    n_eval = recipe.calibration.eval_samples
    eval_sampler = _eval_sampler(family, model_config, recipe, data_dir)
    heldout_before = heldout_attention_error(model, family, eval_sampler, n_eval, n_qb, device, dtype)
    for proc in procs.values():
        proc.observer = observe
    bar = progress(range(start, cfg.steps), desc="stage 1", enabled=show_progress and accelerator.is_main_process,
                   initial=start, total=cfg.steps)
    t0 = time.time()
    try:
        for step in bar:
            t_step = time.time()
            batch = sampler.batch(step)
            step_gen["gen"] = sampler.generator(step, salt=1)
            x_t = flow.add_noise(batch["latents"], batch["noise"], batch["sigma"])
            losses.clear()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                denoiser_forward(model, family, batch, x_t, batch["sigma"], device, dtype)
            layer_losses = _mean_over_processes(accelerator, losses)
            mean_loss = sum(layer_losses.values()) / len(layer_losses)
            _check_finite(mean_loss, "stage-1 loss", ckpt_root)
            if accelerator.num_processes > 1:  # data-parallel: average the router/alpha gradients
                for p in params:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
            optimizer.step()
            if accelerator.is_main_process:
                _append_log(log_path, {"step": step + 1, "loss_rel_mse_mean": mean_loss,
                                       "seconds": round(time.time() - t_step, 3),
                                       "layers": {k: round(v, 6) for k, v in layer_losses.items()}})
            bar.set_postfix(rel_mse=f"{mean_loss:.4f}")
            if (step + 1) % recipe.calibration.checkpoint_every == 0 and step + 1 < cfg.steps \
                    and accelerator.is_main_process:
                save_checkpoint(ckpt_root, step + 1, {
                    "stage": 1, "sla2": {f"{n}.{t}": v.detach().cpu().clone() for n, p in procs.items() for t, v in p.sla2_state().items()},
                    "optimizer": optimizer.state_dict()}, recipe.calibration.checkpoints_total_limit)
    finally:
        for proc in procs.values():
            proc.observer = None
    seconds = round(time.time() - t0, 2)
    heldout_after = heldout_attention_error(model, family, eval_sampler, n_eval, n_qb, device, dtype)
    first_last = _first_last(log_path)
    summary = {"stage1": {"steps": cfg.steps, "tau": tau, "lr": cfg.lr, "alpha_lr": cfg.alpha_lr, "seconds": seconds,
                          "rel_mse_first": first_last[0], "rel_mse_last": first_last[1],
                          "heldout_attention_rel_mse_before": heldout_before,
                          "heldout_attention_rel_mse_after": heldout_after,
                          "data": _data_name(data_dir), **_peak_memory(accelerator)}}
    for p in params:
        p.requires_grad_(False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_results(model, family, workdir, summary)
    accelerator.wait_for_everyone()
    return summary


def _reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_memory(accelerator) -> dict:
    """Peak GPU memory allocated by this stage: the largest over the processes and each process's own.

    A collective when there are several processes: every rank must call it."""
    if not torch.cuda.is_available():
        return {}
    mine = torch.cuda.max_memory_allocated() / 2**30
    peaks = [mine]
    if accelerator.num_processes > 1:
        peaks = accelerator.gather(torch.tensor([mine], device=accelerator.device)).tolist()
    return {"peak_gpu_memory_gb": round(max(peaks), 2), "peak_gpu_memory_gb_per_rank": [round(x, 2) for x in peaks]}


def _fsdp_plugin():
    """The FSDP settings ``accelerate launch --config_file`` put in the environment, or None without FSDP.

    The mixed-precision policy is pinned to fp32: the bf16 compute comes from autocast, as with one
    process or DDP.  accelerate's default bf16 policy would also cast the RoPE tables, the timestep
    input and the modules diffusers keeps in fp32, so an FSDP run would not compute what a
    one-process run computes.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(mixed_precision_policy="fp32")
    if plugin.fsdp_version == 1 and not plugin.use_orig_params:
        raise UsageError("FSDP (version 1) needs 'fsdp_use_orig_params: true' in the accelerate config: stage 2 "
                         "freezes the router but trains alpha and the weights of the same block")
    return plugin


def _accelerator(device, grad_accum: int = 1):
    from accelerate import Accelerator

    return Accelerator(gradient_accumulation_steps=grad_accum,
                       mixed_precision="bf16" if torch.cuda.is_available() and str(device) != "cpu" else "no",
                       cpu=(str(device) == "cpu"), fsdp_plugin=_fsdp_plugin())


def _is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _raw_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _state_options(accelerator):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # On GPUs the full state is gathered to the CPU of the main process only (cpu_offload implies
    # rank 0 only).  On CPU processes every rank gathers it: FSDP's offload of tensors that are
    # already on the CPU crashes (segfault, torch 2.13).
    return StateDictOptions(full_state_dict=True, cpu_offload=accelerator.device.type != "cpu")


def full_model_state(accelerator, model) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state keyed by parameter name, whatever wraps the model (one
    process, DDP, FSDP).  A collective: every rank calls it; on GPUs only the main process gets it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_options(accelerator))


def full_training_state(accelerator, model, optimizer) -> tuple[dict, dict]:
    """Whole model and optimizer state, keyed by parameter name, so a checkpoint does not depend on
    the process count or the sharding.  A collective, like :func:`full_model_state`."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, _raw_optimizer(optimizer), options=_state_options(accelerator))


def load_training_state(model, optimizer, model_state: dict, optim_state: dict) -> None:
    """Load a full checkpoint (every rank reads it) into the prepared model and optimizer; FSDP
    keeps each rank's shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if any(isinstance(key, int) for key in optim_state.get("state", {})):
        raise InputError("this stage-2 checkpoint was written by an older slaconv (optimizer state by position, "
                         "not by parameter name); run the stage again without --resume")
    set_state_dict(model, _raw_optimizer(optimizer), model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))


def _final_model(workdir: Path, state: dict, dtype: str, device, quant: str):
    """A fresh model in the recipe dtype (the modules diffusers keeps in fp32 stay fp32, as after
    ``convert``) holding the trained weights ``state``."""
    net, _, _ = WorkDir(workdir).load_model(dtype=dtype, device=device, quant=quant)
    net.load_state_dict(state)  # strict: copies each tensor into the parameter's own dtype
    return net.eval().requires_grad_(False)


def _mean_over_processes(accelerator, values: dict[str, float]) -> dict[str, float]:
    if accelerator.num_processes == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))


def _data_name(data_dir) -> str:
    """What a summary records about the data: the folder's name (no local paths get published)."""
    return Path(data_dir).name if data_dir else "synthetic"


def _truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _first_last(log_path: Path) -> tuple[float | None, float | None]:
    """Mean loss over the first and the last tenth of the logged steps (single steps are noisy)."""
    if not log_path.exists():
        return None, None
    lines = [json.loads(x) for x in log_path.read_text().splitlines() if x]
    if not lines:
        return None, None
    key = "loss_rel_mse_mean" if "loss_rel_mse_mean" in lines[0] else "loss"
    values = [x[key] for x in lines]
    w = max(1, len(values) // 10)
    return sum(values[:w]) / w, sum(values[-w:]) / w


# ---------------------------------------------------------------- stage 2


def run_stage2(workdir: Path, recipe: dict, *, data_dir=None, resume=None, device="cpu", show_progress=True) -> dict:
    """Stage 2 on every process of the launch (one, DDP or FSDP from the accelerate config): fine-tune
    the weights and alpha with the router frozen; the main process saves the result in the recipe dtype."""
    cfg = recipe.calibration.stage2
    _reset_peak_memory()
    accelerator = _accelerator(device, cfg.grad_accum)
    device = accelerator.device
    quant = cfg.quant or recipe.sla2.quant
    # fp32 master weights (bf16 autocast on GPU): lr-1e-5 updates would vanish in bf16 weights.  Under
    # FSDP every rank loads them on the CPU and FSDP moves only its shard to the GPU while wrapping,
    # so no GPU ever holds the whole fp32 model.
    model, family, sla2_cfg = WorkDir(workdir).load_model(dtype="float32",
                                                          device="cpu" if _is_fsdp(accelerator) else device,
                                                          quant=quant)
    if cfg.objective == "diffusion" and data_dir is None:
        raise InputError("stage 2 with objective 'diffusion' needs real data (--data DIR)")
    model.train()
    model.requires_grad_(True)
    for proc in sla2_processors(model).values():
        proc.router_q.requires_grad_(False)
        proc.router_k.requires_grad_(False)
        proc.alpha_logit.requires_grad_(bool(cfg.train_alpha))
    if cfg.gradient_checkpointing and hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    warmup = max(cfg.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    model_config = WorkDir(workdir).read_model_config()
    sampler = StepSampler(family, model_config, recipe, cfg.batch_size, data_dir,
                          rank=accelerator.process_index, world=accelerator.num_processes)
    ckpt_root = WorkDir(workdir).checkpoints_dir(2)
    log_path = WorkDir(workdir).log_path(2)
    model, optimizer = accelerator.prepare(model, optimizer)
    start = 0
    if resume:
        loaded = load_checkpoint(ckpt_root, resume)
        if loaded is not None:
            start, state = loaded
            load_training_state(model, optimizer, state["model"], state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
    if accelerator.is_main_process:
        if start == 0 and log_path.exists():
            log_path.unlink()
        else:
            _truncate_log(log_path, start)
    dtype = torch.float32  # inputs of the fp32 master model (autocast runs the matmuls in bf16 on GPU)
    teacher_dtype = DTYPES[recipe.model.dtype]  # the teacher is loaded in the recipe dtype
    n_eval = recipe.calibration.eval_samples
    eval_sampler = _eval_sampler(family, model_config, recipe, data_dir)

    def forward(net, batch, x_t, sigma, student_dtype=dtype):
        return denoiser_forward(net, family, batch, x_t, sigma, device, student_dtype)

    targets = None
    show = show_progress and accelerator.is_main_process
    every = recipe.calibration.checkpoint_every
    ga = cfg.grad_accum
    if cfg.objective == "distill":
        targets = TeacherTargets(
            lambda net, b, x, sg: denoiser_forward(net, family, b, x, sg, device, teacher_dtype),
            lambda verify: WorkDir(workdir).load_base_model(dtype=recipe.model.dtype, device=device,
                                                            verify=verify).requires_grad_(False),
            accelerator.autocast, device, cfg.teacher)

    def train_chunk(step):  # (precompute) the micro-batches up to the next checkpoint: one interval at a time
        return sampler, range(step * ga, min(cfg.steps, (step // every + 1) * every) * ga)

    if targets is not None:
        targets.precompute({"eval": (eval_sampler, range(n_eval)), "train": train_chunk(start)}, show)

    def score(net, student_dtype=dtype):
        run = lambda n, b, x, s: forward(n, b, x, s, student_dtype)  # noqa: E731
        return heldout_loss(run, net, targets, eval_sampler, n_eval, device, accelerator.autocast)

    heldout_before = score(model) if start == 0 else None  # every rank: under FSDP a forward is a collective
    bar = progress(range(start, cfg.steps), desc="stage 2", enabled=show_progress and accelerator.is_main_process,
                   initial=start, total=cfg.steps)
    t0 = time.time()
    for step in bar:
        if targets is not None and step != start and step % every == 0:
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
        scheduler.step()
        step_loss = float(accelerator.reduce(torch.tensor(step_loss, device=device), reduction="mean"))
        _check_finite(step_loss, "stage-2 loss", ckpt_root)
        if accelerator.is_main_process:
            _append_log(log_path, {"step": step + 1, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                                   "seconds": round(time.time() - t_step, 3)})
        bar.set_postfix(loss=f"{step_loss:.5f}")
        if (step + 1) % recipe.calibration.checkpoint_every == 0 and step + 1 < cfg.steps:
            accelerator.wait_for_everyone()
            model_state, optim_state = full_training_state(accelerator, model, optimizer)  # every rank
            if accelerator.is_main_process:
                save_checkpoint(ckpt_root, step + 1, {"stage": 2, "model": model_state, "optimizer": optim_state,
                                                      "scheduler": scheduler.state_dict()},
                                recipe.calibration.checkpoints_total_limit)
            del model_state, optim_state
    accelerator.wait_for_everyone()
    seconds = round(time.time() - t0, 2)
    training_peak = _peak_memory(accelerator).get("peak_gpu_memory_gb_per_rank")  # before the main process's save
    full_state = full_model_state(accelerator, model)  # every rank; under FSDP it gathers the shards
    del model, optimizer, scheduler
    accelerator.free_memory()
    net, heldout_after = None, None
    if accelerator.is_main_process:
        net = _final_model(workdir, full_state, recipe.model.dtype, device, quant)
        heldout_after = score(net, DTYPES[recipe.model.dtype])  # as saved: weights in the recipe dtype
    del full_state
    first_last = _first_last(log_path)
    summary = {"stage2": {"steps": cfg.steps, "objective": cfg.objective, "lr": cfg.lr,
                          "teacher": cfg.teacher if cfg.objective == "distill" else None,
                          "heldout_loss_before": heldout_before, "heldout_loss_after": heldout_after,
                          "quant": quant, "batch_size": cfg.batch_size,
                          "grad_accum": cfg.grad_accum, "processes": accelerator.num_processes,
                          "distributed": accelerator.distributed_type.value,
                          "seconds": seconds, "loss_first": first_last[0],
                          "loss_last": first_last[1], "data": _data_name(data_dir), **_peak_memory(accelerator)}}
    if training_peak is not None:
        summary["stage2"]["peak_gpu_memory_gb_per_rank_training"] = training_peak
    if accelerator.is_main_process:
        save_results(net, family, workdir, summary)
    accelerator.wait_for_everyone()
    return summary


def calibrate(workdir: Path, recipe: dict, *, stage: str = "all", data_dir=None, resume=None, device="cpu",
              show_progress=True) -> dict:
    """Run stage 1, stage 2 or both on a work dir written by ``convert``; returns their summaries."""
    workdir = Path(workdir)
    WorkDir(workdir).read_sla2_config()
    out = {"work_dir": str(workdir), "recipe_hash": recipe.hash()}
    WorkDir(workdir).write_recipe(recipe)
    for name, run in (("1", run_stage1), ("2", run_stage2)):
        if stage in (name, "all"):
            try:
                out.update(run(workdir, recipe, data_dir=data_dir, resume=resume, device=device,
                               show_progress=show_progress))
            except torch.OutOfMemoryError:
                raise _oom(name) from None
            out.setdefault("loss_curve", {})[f"stage{name}"] = loss_curve(workdir, int(name))
    return out


def loss_curve(workdir: Path, stage: int) -> list[dict]:
    """One record per logged step of a stage: step, loss (stage 1: mean relative attention MSE over
    layers), learning rate (stage 2) and wall seconds; stage 1's per-layer detail stays in the log."""
    path = WorkDir(workdir).log_path(stage)
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [{k: v for k, v in r.items() if k != "layers"} for r in records]
