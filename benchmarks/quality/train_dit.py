"""Train the benchmark's original model: a small Wan-architecture video DiT on SynthVideo.

A stock ``WanTransformer3DModel`` (6 layers, 4 heads x 64, FFN 1024; 7.0 M parameters) learns
flow matching (x_t = (1 - s) x0 + s noise, target v = noise - x0, s logit-normal) on 16 x 64 x 64
four-channel videos, 16,384 tokens each, conditioned on a fixed per-class embedding through
``encoder_hidden_states``.  bf16 autocast on GPU, AdamW with warm-up and cosine decay, an EMA of the
weights (what is saved), fresh data every step (no epochs, no over-fitting).

    python benchmarks/quality/train_dit.py --out OUT/dit                  # one H100: ~8 min
    python benchmarks/quality/train_dit.py --out /tmp/dit --smoke         # CPU: < 60 s

Writes to --out:
    model/                 the checkpoint, a diffusers folder (fp16 safetensors, <= 16 MB)
    train_log.jsonl        loss every --log-every steps (+ lr, samples/s)
    loss_curve.png         training loss (and the EMA'd loss), log scale
    samples.png            one generated video per class (rows) next to real videos of that class
    train_summary.json     settings, wall time, throughput, final and held-out loss, size
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import qcommon as common  # noqa: E402
import metrics  # noqa: E402
import synthvideo as sv  # noqa: E402

MAX_CHECKPOINT_MB = 16.0

# Defaults for one H100 (measured: see README.md); --smoke for CPU tests.
GPU_DEFAULTS = {"steps": 1050, "batch_size": 16, "lr": 6e-4, "warmup": 100, "ema": 0.998, "log_every": 20}
SMOKE_DEFAULTS = {"steps": 30, "batch_size": 4, "lr": 2e-3, "warmup": 5, "ema": 0.9, "log_every": 5}


def logit_normal(n: int, gen: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    return torch.sigmoid(mean + std * torch.randn(n, generator=gen)).clamp(1e-4, 1 - 1e-4)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1 - decay)


def train(out: Path, *, smoke: bool = False, steps: int | None = None, batch_size: int | None = None,
          lr: float | None = None, warmup: int | None = None, ema_decay: float | None = None,
          max_minutes: float | None = None, compile_model: bool = False, device: str = "auto", seed: int = 0,
          log_every: int | None = None, log=print) -> dict:
    d = {**(SMOKE_DEFAULTS if smoke else GPU_DEFAULTS)}
    for k, v in dict(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, ema=ema_decay, log_every=log_every).items():
        if v is not None:
            d[k] = v
    spec = common.spec_for(smoke)
    config = dict(common.SMOKE_MODEL_CONFIG if smoke else common.MODEL_CONFIG)
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
    emb_table = sv.class_embeddings(spec).to(dev)
    glyphs = sv.glyph_bank(spec).to(dev)
    gen = torch.Generator().manual_seed(seed + 17)  # noise levels (CPU)
    gen_noise = torch.Generator(device=dev).manual_seed(seed + 29)  # noise tensors, drawn on the device
    log(f"training {n_params / 1e6:.2f} M-parameter Wan DiT on {spec.tokens()} tokens/sample, "
        f"{d['steps']} steps x batch {d['batch_size']} on {dev}")

    log_path = out / "train_log.jsonl"
    curve: list[tuple[float, float]] = []
    smooth_curve: list[tuple[float, float]] = []
    smooth = None
    timer = common.Timer()
    steps_done, stopped_early, t_data = 0, False, 0.0
    with open(log_path, "w") as fh:
        for step in range(d["steps"]):
            if max_minutes is not None and timer() > max_minutes * 60:
                stopped_early = True
                log(f"stopping at step {step}: --max-minutes {max_minutes} reached")
                break
            td = common.Timer()
            x0, y = sv.generate(common.TRAIN_SEED, range(step * d["batch_size"], (step + 1) * d["batch_size"]), spec,
                                device=dev, glyphs=glyphs)
            noise = torch.randn(x0.shape, generator=gen_noise, device=dev)
            s = logit_normal(x0.shape[0], gen).to(dev)
            t_data += td()
            x_t = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * noise
            for g in opt.param_groups:
                g["lr"] = lr_at(step, d["steps"], d["lr"], d["warmup"])
            with common.autocast(dev):
                pred = fwd(hidden_states=x_t, timestep=s * 1000, encoder_hidden_states=emb_table[y],
                           return_dict=False)[0]
            loss = torch.mean((pred.float() - (noise - x0)) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if ema is not None:
                ema_update(ema, model, min(d["ema"], (1 + step) / (10 + step)))
            steps_done = step + 1
            if step % d["log_every"] == 0 or step == d["steps"] - 1:
                value = loss.item()
                if not math.isfinite(value):
                    raise RuntimeError(f"training diverged at step {step + 1} (loss {value})")
                smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
                elapsed = timer()
                rec = {"step": step + 1, "loss": round(value, 5), "loss_smooth": round(smooth, 5),
                       "lr": round(opt.param_groups[0]["lr"], 7), "seconds": round(elapsed, 2),
                       "samples_per_s": round(steps_done * d["batch_size"] / max(elapsed, 1e-9), 2)}
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                curve.append((step + 1, value))
                smooth_curve.append((step + 1, smooth))
                if step % (d["log_every"] * 10) == 0 or step == d["steps"] - 1:
                    log(f"step {step + 1}/{d['steps']} loss {value:.4f} (smoothed {smooth:.4f}) "
                        f"{rec['samples_per_s']:.1f} samples/s, {elapsed:.0f} s")
    common.sync(dev)
    train_seconds = timer()

    final = ema if ema is not None else model
    final.eval()
    model_dir = out / "model"
    # Save fp16 weights (the shipped checkpoint); everything downstream evaluates this file.
    from safetensors.torch import save_file

    model_dir.mkdir(parents=True, exist_ok=True)
    final.save_config(model_dir)
    save_file({k: v.detach().to(torch.float16).cpu().contiguous() for k, v in final.state_dict().items()},
              str(model_dir / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    size_mb = common.file_mb(model_dir)
    if size_mb > MAX_CHECKPOINT_MB:
        raise RuntimeError(f"checkpoint is {size_mb:.1f} MB > {MAX_CHECKPOINT_MB} MB")
    saved = common.load_model(model_dir, dev)

    hs = metrics.heldout_set(spec, 16 if smoke else 64)
    held = metrics.heldout_fm_loss(saved, hs, dev)
    # Samples: one per class (rows), next to a real video of the same class.
    ss = metrics.sampling_set(spec, 1)
    steps_sample = common.SMOKE_SAMPLE_STEPS if smoke else common.SAMPLE_STEPS
    gen_videos = common.sample(saved, ss["noise"].to(dev), ss["emb"].to(dev), steps_sample).cpu()
    real, _ = sv.generate(common.HELDOUT_SEED, range(spec.num_classes), spec,
                          labels=sv.balanced_labels(spec.num_classes, spec))
    rows, names = [], []
    for k in range(spec.num_classes):
        rows += [real[k], gen_videos[k]]
        names += [f"{sv.GLYPHS[k]} real", f"{sv.GLYPHS[k]} DiT"]
    sv.save_video_grid(out / "samples.png", rows, row_labels=names,
                       frames=list(range(0, spec.frames, max(1, spec.frames // 8))))
    common.line_plot(out / "loss_curve.png", {"loss": curve, "loss (EMA 0.9 of logged)": smooth_curve},
                     f"flow-matching loss, {steps_done} steps x batch {d['batch_size']}")
    summary = {
        "settings": {**d, "smoke": smoke, "seed": seed, "compile": compile_model, "max_minutes": max_minutes,
                     "timesteps": "logit-normal(0, 1)"},
        "model_config": config, "spec": spec.to_dict(), "parameters": n_params,
        "steps_done": steps_done, "stopped_early": stopped_early,
        "train_seconds": round(train_seconds, 1), "data_seconds": round(t_data, 1),
        "samples_per_s": round(steps_done * d["batch_size"] / max(train_seconds, 1e-9), 2),
        "final_loss_smoothed": smooth, "heldout_fm_loss": held, "checkpoint_mb": round(size_mb, 2),
        "checkpoint_dtype": "float16", "env": common.env_summary(),
    }
    common.write_json(out / "train_summary.json", summary)
    log(f"trained {steps_done} steps in {train_seconds:.0f} s ({summary['samples_per_s']} samples/s); "
        f"held-out FM loss {held['loss']:.4f}; checkpoint {size_mb:.1f} MB -> {model_dir}")
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny model, tiny videos, CPU, < 60 s")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--ema", type=float, help="EMA decay (0 = off)")
    ap.add_argument("--max-minutes", type=float, help="stop training (and save) after this much wall time")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int)
    args = ap.parse_args(argv)
    train(args.out, smoke=args.smoke, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
          ema_decay=args.ema, max_minutes=args.max_minutes, compile_model=args.compile, device=args.device,
          seed=args.seed, log_every=args.log_every)


if __name__ == "__main__":
    main()
