"""Train the benchmark's original model: a small Wan-architecture video DiT on SynthVideo.

A stock ``WanTransformer3DModel`` (6 layers, 4 heads x 64, FFN 1024; 6.9 M parameters) learns
flow matching (x_t = (1 - s) x0 + s noise, target v = noise - x0, s logit-normal) on 8 x 64 x 64
four-channel videos, 8,192 tokens each, conditioned on a fixed per-class embedding through
``encoder_hidden_states``.  Every step also trains on single frames of the same generator (joint
image-video training: frames are ~8x cheaper than videos and teach the glyph shapes), and 10 % of
all samples get the null (all-zero) embedding, so samplers can use classifier-free guidance.
bf16 autocast on GPU, fused AdamW with warm-up and cosine decay (ending with the wall-time budget
when that comes first), an EMA of the weights (what is saved), fresh data every step (no epochs).

    python -m slaconv.quality.train_dit --out OUT/dit                  # one H100: 6.5 min + ~20 s
    python -m slaconv.quality.train_dit --out OUT/dit --smoke          # CPU: < 60 s

Writes to --out:
    model/                 the checkpoint, a diffusers folder (fp16 safetensors, <= 16 MB)
    train_log.jsonl        loss every --log-every steps (+ single-frame loss, lr, schedule progress, samples/s)
    loss_curve.png         training loss (and the EMA'd loss), log scale
    samples.png            per class: a real video, a guided sample and an unguided sample
    train_summary.json     settings, wall time, throughput, final and held-out loss, class gain, size
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from slaconv.errors import DivergedError, UsageError
from slaconv.quality import common, content, metrics
from slaconv.quality import photovideo as pv
from slaconv.quality.command_line import (
    non_negative_float,
    non_negative_int,
    one_line_errors,
    positive_int,
    share,
    training_parser,
)
from slaconv.quality.images import line_plot, save_video_grid

MAX_CHECKPOINT_MB = 16.0

# Defaults for one H100 (benchmarks/quality/README.md, "Why these defaults"); --smoke for CPU tests.
# Each step trains on 16 videos (8 x 64 x 64, 8,192 tokens each) and 128 single frames of the same
# generator (joint image-video training, equal weight); a 6.5-minute wall-time budget ends the schedule
# and the run (whichever of it and the step count comes first), so training and the classifier
# together finish within 10 minutes.
GPU_DEFAULTS = {"steps": 1700, "batch_size": 16, "image_batch": 128, "lr": 8e-4, "warmup": 100, "ema": 0.995,
                "log_every": 20, "cond_dropout": 0.1, "max_minutes": 6.5}
SMOKE_DEFAULTS = {"steps": 30, "batch_size": 4, "image_batch": 4, "lr": 2e-3, "warmup": 5, "ema": 0.9,
                  "log_every": 5, "cond_dropout": 0.25, "max_minutes": None}


def logit_normal(n: int, gen: torch.Generator, device, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Training noise levels s ~ sigmoid(N(mean, std)), drawn on ``device`` (no host round trip)."""
    z = torch.randn(n, generator=gen, device=device)
    return torch.sigmoid(mean + std * z).clamp(1e-4, 1 - 1e-4)


def progress_at(step: int, total: int, elapsed_s: float, budget_s: float | None) -> float:
    """How far the schedule is, in [0, 1]: by steps, or by wall time when a budget is set (whichever is further).

    With a wall-time budget (--max-minutes) the learning rate reaches its floor when the budget runs
    out, even if the GPU is slower than the step count assumed.
    """
    p = step / max(1, total)
    if budget_s:
        p = max(p, elapsed_s / budget_s)
    return min(1.0, p)


def lr_at(step: int, progress: float, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``base`` down to 10 % of it."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter (one fused call)."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)


def make_batch(step: int, batch_size: int, spec: content.Spec, dev: torch.device, loaded,
               emb_table: torch.Tensor, null: torch.Tensor, cond_dropout: float, gen: torch.Generator,
               stream: int = common.TRAIN_SEED) -> dict:
    """Fresh training videos (indices never repeat), noise, noise levels and conditioning for one step.

    A share ``cond_dropout`` of the samples gets the null embedding instead of its class embedding,
    so the model also learns the unconditional velocity that classifier-free guidance needs.
    """
    x0, y = content.generate(stream, range(step * batch_size, (step + 1) * batch_size), spec, device=dev,
                             loaded=loaded)
    noise = torch.randn(x0.shape, generator=gen, device=dev)
    s = logit_normal(x0.shape[0], gen, dev)
    cond = emb_table[y]
    if cond_dropout > 0:
        drop = torch.rand(x0.shape[0], generator=gen, device=dev) < cond_dropout
        cond = torch.where(drop.view(-1, 1, 1), null.expand_as(cond), cond)
    sv_ = s.view(-1, 1, 1, 1, 1)
    return {"x_t": (1 - sv_) * x0 + sv_ * noise, "target": noise - x0, "s": s, "cond": cond}


def fm_loss(fwd, batch: dict, dev: torch.device) -> torch.Tensor:
    """Flow-matching loss of one batch: mean squared error of the predicted velocity."""
    with common.autocast(dev):
        pred = fwd(hidden_states=batch["x_t"], timestep=batch["s"] * 1000, encoder_hidden_states=batch["cond"],
                   return_dict=False)[0]
    return torch.mean((pred.float() - batch["target"]) ** 2)


def data_seconds_per_batch(spec: content.Spec, batch_size: int, dev: torch.device, loaded,
                           repeats: int = 3) -> float:
    """Wall time to make one training batch, synchronised (the loop itself never waits for the GPU)."""
    content.generate(common.TRAIN_SEED, range(10**9 - batch_size, 10**9), spec, device=dev, loaded=loaded)  # warm-up
    common.sync(dev)
    t = common.Timer()
    for r in range(repeats):
        content.generate(common.TRAIN_SEED, range(10**9 + r * batch_size, 10**9 + (r + 1) * batch_size), spec,
                         device=dev, loaded=loaded)
    common.sync(dev)
    return t() / repeats


def save_fp16(model: torch.nn.Module, model_dir: Path) -> float:
    """Write ``model`` as a diffusers folder with fp16 weights; returns the size in MB (<= 16 MB enforced)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_config(model_dir)
    save_file({k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()},
              str(model_dir / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    size_mb = common.file_mb(model_dir)
    if size_mb > MAX_CHECKPOINT_MB:
        raise RuntimeError(f"checkpoint is {size_mb:.1f} MB > {MAX_CHECKPOINT_MB} MB")
    return size_mb


def save_preview(model, out_png: Path, spec: content.Spec, dev: torch.device, steps: int, guidance: float) -> None:
    """samples.png: per class, a real video, the model's guided sample and its unguided (guidance 1) sample.

    PhotoVideo's held-out stream shows photos the model never saw, so its preview shows unseen camera
    paths over the training photos instead (one per motion).
    """
    labels = content.preview_labels(spec)
    stream, first = (common.TRAIN_SEED, 10**8) if content.is_photos(spec) else (common.HELDOUT_SEED, 0)
    real, y = content.generate(stream, range(first, first + len(labels)), spec, labels=labels)
    ss = metrics.sampling_set(spec, 1, labels=y.tolist())
    noise, emb = ss["noise"].to(dev), ss["emb"].to(dev)
    guided = common.sample(model, noise, emb, steps, guidance=guidance, null=ss["null"].to(dev)).cpu()
    plain = common.sample(model, noise, emb, steps).cpu() if guidance != 1.0 else None
    rows, names = [], []
    for k, label in enumerate(y.tolist()):
        name = content.label_name(spec, label)
        rows += [real[k], guided[k]]
        names += [f"{name} real", f"{name} DiT g{guidance:g}"]
        if plain is not None:
            rows.append(plain[k])
            names.append(f"{name} DiT g1")
    save_video_grid(out_png, rows, row_labels=names, frames=list(range(0, spec.frames, max(1, spec.frames // 8))))


def resolve_settings(smoke: bool, **overrides) -> dict:
    """The defaults (GPU or smoke) with every override that is not None applied."""
    d = {**(SMOKE_DEFAULTS if smoke else GPU_DEFAULTS)}
    d.update({k: v for k, v in overrides.items() if v is not None})
    return d


def train(out: Path, *, smoke: bool = False, steps: int | None = None, batch_size: int | None = None,
          lr: float | None = None, warmup: int | None = None, ema_decay: float | None = None,
          cond_dropout: float | None = None, image_batch: int | None = None, guidance: float | None = None,
          max_minutes: float | None = None, compile_model: bool = False, device: str = "auto", seed: int = 0,
          log_every: int | None = None, spec: content.Spec | None = None, model_config: dict | None = None,
          on_step=None, log=print) -> dict:
    """Train the original DiT and write the checkpoint, log, loss curve, preview and summary to ``out``.

    ``spec`` / ``model_config`` override the video spec and architecture (CPU studies at reduced
    size); ``on_step(step, model)`` is called after every optimiser step.
    """
    d = resolve_settings(smoke, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, ema=ema_decay,
                         log_every=log_every, cond_dropout=cond_dropout, image_batch=image_batch,
                         max_minutes=max_minutes)
    max_minutes = d["max_minutes"] or None  # 0 = no wall-time budget
    guidance = common.SAMPLE_GUIDANCE if guidance is None else guidance
    if guidance != 1.0 and d["cond_dropout"] <= 0:
        raise UsageError("guided sampling needs a model trained with conditioning dropout (--cond-dropout > 0)")
    spec = spec or common.spec_for(smoke)
    config = dict(model_config or (common.SMOKE_MODEL_CONFIG if smoke else common.MODEL_CONFIG))
    config.update(in_channels=spec.channels, out_channels=spec.channels)  # PhotoVideo is RGB, SynthVideo RGB + mask
    dev = common.pick_device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    model = common.build_model(config, seed).to(dev).train()
    n_params = sum(p.numel() for p in model.parameters())
    ema = copy.deepcopy(model).eval().requires_grad_(False) if d["ema"] else None
    opt = torch.optim.AdamW(model.parameters(), lr=d["lr"], betas=(0.9, 0.99), weight_decay=0.01,
                            fused=dev.type == "cuda")
    fwd = torch.compile(model) if compile_model else model
    emb_table = content.class_embeddings(spec).to(dev)
    null = content.null_embedding(spec).to(dev)
    loaded = content.assets(spec, dev)
    image_spec = dataclasses.replace(spec, frames=1)
    gen = torch.Generator(device=dev).manual_seed(seed + 29)  # noise, noise levels, dropout: on the device
    data_s = data_seconds_per_batch(spec, d["batch_size"], dev, loaded)
    if d["image_batch"]:
        data_s += data_seconds_per_batch(image_spec, d["image_batch"], dev, loaded)
    log(f"training {n_params / 1e6:.2f} M-parameter Wan DiT on {spec.tokens()} tokens/sample, "
        f"{d['steps']} steps x batch {d['batch_size']} (+ {d['image_batch']} single frames) on {dev}, "
        f"cond. dropout {d['cond_dropout']}, budget {max_minutes or '-'} min; "
        f"a step's data takes {data_s * 1e3:.1f} ms")

    budget_s = max_minutes * 60 if max_minutes else None
    curve: list[tuple[float, float]] = []
    smooth_curve: list[tuple[float, float]] = []
    image_curve: list[tuple[float, float]] = []
    smooth = None
    timer = common.Timer()
    steps_done, stopped_early = 0, False
    with open(out / "train_log.jsonl", "w") as fh:
        for step in range(d["steps"]):
            elapsed = timer()
            if budget_s is not None and elapsed > budget_s:
                stopped_early = True
                log(f"stopping at step {step}: --max-minutes {max_minutes} reached")
                break
            progress = progress_at(step, d["steps"], elapsed, budget_s)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, progress, d["lr"], d["warmup"])
            opt.zero_grad(set_to_none=True)
            batch = make_batch(step, d["batch_size"], spec, dev, loaded, emb_table, null, d["cond_dropout"], gen)
            loss = fm_loss(fwd, batch, dev)
            if d["image_batch"]:  # joint image-video training: single-frame clips, same weight as the videos
                (0.5 * loss).backward()  # one graph at a time: the peak memory of one batch
                images = make_batch(step, d["image_batch"], image_spec, dev, loaded, emb_table, null,
                                    d["cond_dropout"], gen, stream=common.IMAGE_SEED)
                image_loss = fm_loss(fwd, images, dev)
                (0.5 * image_loss).backward()
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if ema is not None:
                ema_update(ema, model, min(d["ema"], (1 + step) / (10 + step)))
            if on_step is not None:
                on_step(step, model)
            steps_done = step + 1
            if step % d["log_every"] == 0 or step == d["steps"] - 1:
                value = loss.item()
                image_value = image_loss.item() if d["image_batch"] else 0.0
                if not (math.isfinite(value) and math.isfinite(image_value)):
                    raise DivergedError(f"training diverged at step {step + 1} "
                                        f"(loss {value}, single frames {image_value})")
                smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
                elapsed = timer()
                rec = {"step": step + 1, "loss": round(value, 5), "loss_smooth": round(smooth, 5),
                       "lr": round(opt.param_groups[0]["lr"], 7), "progress": round(progress, 4),
                       "seconds": round(elapsed, 2),
                       "samples_per_s": round(steps_done * d["batch_size"] / max(elapsed, 1e-9), 2)}
                if d["image_batch"]:
                    rec["image_loss"] = round(image_value, 5)
                    image_curve.append((step + 1, rec["image_loss"]))
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                curve.append((step + 1, value))
                smooth_curve.append((step + 1, smooth))
                if step % (d["log_every"] * 10) == 0 or step == d["steps"] - 1:
                    log(f"step {step + 1}/{d['steps']} loss {value:.4f} (smoothed {smooth:.4f}) lr {rec['lr']:.2e} "
                        f"{rec['samples_per_s']:.1f} samples/s, {elapsed:.0f} s")
    common.sync(dev)
    train_seconds = timer()

    final = ema if ema is not None else model
    final.eval()
    model_dir = out / "model"
    size_mb = save_fp16(final, model_dir)  # everything downstream evaluates this file
    saved = common.load_model(model_dir, dev)
    t_eval = common.Timer()
    hs = metrics.heldout_set(spec, 16 if smoke else 64)
    held = metrics.heldout_fm_loss(saved, hs, dev)
    gain = metrics.class_gain(saved, hs, spec, dev)
    save_preview(saved, out / "samples.png", spec, dev, common.SMOKE_SAMPLE_STEPS if smoke else common.SAMPLE_STEPS,
                 guidance)
    series = {"video loss": curve, "video loss (EMA 0.9 of logged)": smooth_curve}
    if image_curve:
        series["single-frame loss"] = image_curve
    line_plot(out / "loss_curve.png", series,
                     f"flow-matching loss, {steps_done} steps x batch {d['batch_size']}"
                     + (f" (+ {d['image_batch']} single frames)" if d["image_batch"] else ""))
    summary = {
        "settings": {**d, "smoke": smoke, "seed": seed, "compile": compile_model,
                     "timesteps": "logit-normal(0, 1)", "null_embedding": "zeros", "sample_guidance": guidance,
                     "schedule": "cosine to 10 % over steps, or over --max-minutes when that comes first"},
        "model_config": config, "spec": spec.to_dict(), "parameters": n_params,
        "steps_done": steps_done, "stopped_early": stopped_early,
        "train_seconds": round(train_seconds, 1), "data_seconds_per_batch": round(data_s, 4),
        "samples_per_s": round(steps_done * d["batch_size"] / max(train_seconds, 1e-9), 2),
        "single_frames_per_s": round(steps_done * d["image_batch"] / max(train_seconds, 1e-9), 2),
        "seconds_per_step": round(train_seconds / max(1, steps_done), 4),
        "eval_seconds": round(t_eval(), 1),
        "final_loss_smoothed": smooth, "heldout_fm_loss": held, "class_gain": gain, "checkpoint_mb": round(size_mb, 2),
        "checkpoint_dtype": "float16", "env": common.env_summary(),
    }
    common.write_json(out / "train_summary.json", summary)
    log(f"trained {steps_done} steps in {train_seconds:.0f} s ({summary['samples_per_s']} samples/s); "
        f"held-out FM loss {held['loss']:.4f} (+{gain['wrong_class']['loss']:.4f} with a wrong class, "
        f"+{gain['null']['loss']:.4f} with the null embedding); checkpoint {size_mb:.1f} MB -> {model_dir}")
    return summary


@one_line_errors
def main(argv=None) -> None:
    ap = training_parser(__doc__.split("\n\n")[0], smoke_help="tiny model, tiny videos, CPU, < 60 s")
    ap.add_argument("--warmup", type=non_negative_int)
    ap.add_argument("--ema", type=share, help="EMA decay (0 = off)")
    ap.add_argument("--cond-dropout", type=share, help="share of samples trained with the null embedding")
    ap.add_argument("--image-batch", type=non_negative_int,
                    help="single-frame clips trained beside every video batch (joint image-video training; 0 = off)")
    ap.add_argument("--guidance", type=non_negative_float,
                    help=f"guidance of the preview samples (default {common.SAMPLE_GUIDANCE})")
    ap.add_argument("--max-minutes", type=non_negative_float,
                    help="wall-time budget of the training loop: the lr schedule ends and training stops (and saves) "
                         f"then (default {GPU_DEFAULTS['max_minutes']} on the GPU; 0 = none)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the model (off by default and untested on a GPU; with --image-batch it "
                         "sees two input shapes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=positive_int)
    ap.add_argument("--photos", type=Path, default=None,
                    help="photo folder of the PhotoVideo source (default $SLACONV_PHOTOS, else scikit-image's data)")
    ap.add_argument("--spec", default="{}",
                    help='JSON overrides of the video spec, e.g. \'{"texture": 0.15}\', or \'{"source": "photos"}\' '
                         'for videos of photographs (saved in train_summary.json, '
                         "which the table, the classifier and attention_stats read)")
    args = ap.parse_args(argv)
    try:
        spec = content.spec_with(args.smoke, json.loads(args.spec))
    except (ValueError, TypeError, AttributeError) as e:  # bad JSON, or a key VideoSpec does not have
        ap.error(f"--spec: {e}")
    if args.photos is not None:
        os.environ[pv.PHOTOS_ENV] = str(args.photos)  # read by every later photo_bank() of this process
    train(args.out, smoke=args.smoke, spec=spec, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
          warmup=args.warmup, ema_decay=args.ema, cond_dropout=args.cond_dropout, image_batch=args.image_batch,
          guidance=args.guidance, max_minutes=args.max_minutes, compile_model=args.compile, device=args.device,
          seed=args.seed, log_every=args.log_every)


if __name__ == "__main__":
    main()
