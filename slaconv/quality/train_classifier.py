"""Train the per-frame glyph classifier used as the benchmark's semantic score.

Trained on clean SynthVideo videos (its own generator stream, disjoint from the DiT's), with noise
and blur augmentation so that slightly imperfect generated videos are still judged by their shape.

    python -m slaconv.quality.train_classifier --out OUT/classifier            # GPU: ~45 s
    python -m slaconv.quality.train_classifier --out OUT/classifier --smoke    # CPU: seconds

Writes ``classifier.safetensors``, ``classifier.json`` (config + held-out accuracy) and
``classifier_log.jsonl``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from slaconv.quality import common, metrics
from slaconv.quality import synthvideo as sv
from slaconv.quality.command_line import one_line_errors, training_parser


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample Gaussian noise (sigma up to 0.3), a 3x3 blur on a third of the batch, a brightness shift."""
    b = x.shape[0]
    dev = x.device
    sigma = torch.rand(b, generator=gen).to(dev).view(-1, 1, 1, 1, 1) * 0.3
    noise = torch.randn(x.shape, generator=gen).to(dev)
    blur_mask = (torch.rand(b, generator=gen) < 0.33).to(dev).view(-1, 1, 1, 1, 1)
    c, f, h, w = x.shape[1:]
    blurred = F.avg_pool2d(x.transpose(1, 2).reshape(-1, c, h, w), 3, stride=1, padding=1,
                           count_include_pad=False).view(b, f, c, h, w).transpose(1, 2)
    x = torch.where(blur_mask, blurred, x)
    shift = (torch.rand(b, generator=gen).to(dev).view(-1, 1, 1, 1, 1) - 0.5) * 0.2
    return (x + shift + sigma * noise).clamp(-1, 1)


def score_model(clf, model_dir: Path, spec: sv.VideoSpec, dev: torch.device, *, per_class: int, steps: int,
                log=print) -> dict:
    """The judge's verdict on a trained DiT's own samples: unguided, and guided if it learned the null embedding."""
    model_spec, cond_dropout = common.trained_spec(model_dir)
    metrics.require_same_videos(model_spec, spec, str(model_dir), "this classifier")
    model = common.load_model(model_dir, dev)
    guidances = [1.0] + ([common.SAMPLE_GUIDANCE] if cond_dropout > 0 else [])
    scores, _ = metrics.sample_class_scores(model, clf, spec, dev, per_class=per_class, steps=steps,
                                            guidances=guidances)
    for g, sc in scores.items():
        log(f"classifier on {model_dir}'s samples, guidance {g}: per-frame accuracy {sc['accuracy']:.3f}, "
            f"video accuracy {sc['video_accuracy']:.3f} ({per_class * spec.num_classes} videos, {steps} steps)")
    return {"model": str(model_dir), "per_class": per_class, "sample_steps": steps, "by_guidance": scores}


def train(out: Path, *, smoke: bool = False, steps: int | None = None, batch_size: int | None = None,
          lr: float = 3e-3, width: int | None = None, device: str = "auto", spec: sv.VideoSpec | None = None,
          score_model_dir: Path | None = None, log=print) -> dict:
    """Train the judge on its own generator stream and save it (with held-out accuracies) to ``out``.

    ``spec`` overrides the video spec (CPU studies at reduced size).  With ``score_model_dir`` the
    judge then scores that DiT's own samples (``dit_samples`` in the summary).
    """
    spec = spec or common.spec_for(smoke)
    dev = common.pick_device(device)
    steps = steps or (60 if smoke else 300)
    batch_size = batch_size or (16 if smoke else 32)
    width = width or (12 if smoke else 32)
    torch.manual_seed(0)
    clf = metrics.FrameClassifier(spec.channels, spec.num_classes, width).to(dev)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    glyphs = sv.glyph_bank(spec).to(dev)
    gen = torch.Generator().manual_seed(5)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "classifier_log.jsonl"
    timer = common.Timer()
    with open(log_path, "w") as fh:
        for step in range(steps):
            idx = range(step * batch_size, (step + 1) * batch_size)
            x, y = sv.generate(common.CLASSIFIER_SEED, idx, spec, device=dev, glyphs=glyphs)
            x = augment(x, gen)
            with common.autocast(dev):
                logits = clf(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.repeat_interleave(spec.frames))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 10 == 0 or step == steps - 1:
                rec = {"step": step + 1, "loss": round(loss.item(), 5), "seconds": round(timer(), 2)}
                fh.write(json.dumps(rec) + "\n")
                if step % 100 == 0 or step == steps - 1:
                    log(f"classifier step {step + 1}/{steps} loss {loss.item():.4f}")
    clf.eval()
    n_eval = 64 if smoke else 256
    x, y = sv.generate(common.HELDOUT_SEED, range(n_eval), spec, labels=sv.balanced_labels(n_eval, spec), device=dev,
                       glyphs=glyphs)
    clean = metrics.classifier_scores(clf, x, y)
    noisy = metrics.classifier_scores(clf, (x + 0.2 * torch.randn(x.shape, generator=gen).to(dev)).clamp(-1, 1), y)
    summary = {"steps": steps, "batch_size": batch_size, "width": width, "seconds": round(timer(), 2),
               "heldout_clean": clean, "heldout_noise0.2": noisy, "chance": 1.0 / spec.num_classes,
               "spec": spec.to_dict(), "device": str(dev)}
    if score_model_dir is not None:
        summary["dit_samples"] = score_model(clf, Path(score_model_dir), spec, dev, per_class=1 if smoke else 8,
                                             steps=common.SMOKE_SAMPLE_STEPS if smoke else common.SAMPLE_STEPS,
                                             log=log)
    summary["seconds"] = round(timer(), 2)
    metrics.save_classifier(clf.cpu(), out, {"summary": summary})
    log(f"classifier: held-out per-frame accuracy {clean['accuracy']:.3f} (clean), "
        f"{noisy['accuracy']:.3f} (noise 0.2); chance {1 / spec.num_classes:.3f}; {timer():.1f} s")
    return summary


@one_line_errors
def main(argv=None) -> None:
    ap = training_parser(__doc__.split("\n\n")[0], smoke_help="tiny CPU run (tests)", lr_default=3e-3)
    ap.add_argument("--score-model", type=Path,
                    help="a trained DiT folder: train on the videos it was trained on, then score its own samples")
    args = ap.parse_args(argv)
    spec = common.trained_spec(args.score_model)[0] if args.score_model else None
    train(args.out, smoke=args.smoke, steps=args.steps, batch_size=args.batch_size, lr=args.lr, device=args.device,
          score_model_dir=args.score_model, spec=spec)


if __name__ == "__main__":
    main()
