"""CPU proxy studies behind the quality benchmark's training defaults (README.md, "Why these defaults").

The real original is trained on a GPU; here the SAME code (train_dit.train, train_classifier.train,
the guided sampler, the judge) runs at reduced size on a CPU so that choices can be compared by
measurement: video spec (glyph size, object count), conditioning dropout + guidance scale, learning
rate, EMA decay.  A proxy run trains a small DiT on tiny videos, trains a judge on the same spec,
then scores the DiT's own samples at several guidance scales (per-frame accuracy vs the class).

    python benchmarks/quality/cpu_study.py --out /tmp/study --name big --steps 400 \\
        --spec '{"min_scale": 0.22, "max_scale": 0.32, "min_objects": 1, "max_objects": 2}'

Writes OUT/NAME/{result.json, samples.png, dit/, clf/}.  One thread by default; minutes per run.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import qcommon as common  # noqa: E402
import metrics  # noqa: E402
import synthvideo as sv  # noqa: E402

# Proxy size: 2 frames of 32 x 32 (512 tokens), all 8 classes; a 4-layer, 2-head (x 64) DiT, 1.2 M parameters.
PROXY_SPEC = {"frames": 2, "size": 32, "glyph_res": 32}
PROXY_MODEL = {**common.MODEL_CONFIG, "num_attention_heads": 2, "num_layers": 4, "ffn_dim": 512, "freq_dim": 64}


class GainTracker:
    """Every ``every`` steps, the class gain (metrics.class_gain) of the live weights on a small held-out set."""

    def __init__(self, spec: "sv.VideoSpec", every: int, num: int = 40):
        self.spec, self.every, self.hs, self.history = spec, every, metrics.heldout_set(spec, num), []

    def __call__(self, step: int, model: torch.nn.Module) -> None:
        if (step + 1) % self.every:
            return
        model.eval()
        g = metrics.class_gain(model, self.hs, self.spec, "cpu")
        model.train()
        self.history.append({"step": step + 1, "wrong_class": round(g["wrong_class"]["loss"], 5),
                             "null": round(g["null"]["loss"], 5)})


class ExtraEmas:
    """EMAs of the training weights at several decays, updated by train_dit's ``on_step`` hook."""

    def __init__(self, decays):
        self.decays, self.models = list(decays), {}

    def __call__(self, step: int, model: torch.nn.Module) -> None:
        import train_dit

        for d in self.decays:
            if d not in self.models:
                self.models[d] = copy.deepcopy(model).eval().requires_grad_(False)
            else:
                train_dit.ema_update(self.models[d], model, min(d, (1 + step) / (10 + step)))


def proxy_run(out: Path, name: str, spec_over: dict, model_over: dict, train_kw: dict, guidances, per_class: int,
              extra_emas=(), clf_steps: int = 200, track_every: int = 0, log=print) -> dict:
    """Train a proxy DiT and a proxy judge on one spec; score the DiT's samples per guidance (and per EMA)."""
    import train_classifier
    import train_dit

    spec = sv.VideoSpec(**{**PROXY_SPEC, **spec_over})
    config = {**PROXY_MODEL, **model_over}
    run_dir = Path(out) / name
    emas = ExtraEmas(extra_emas)
    tracker = GainTracker(spec, track_every) if track_every else None

    def on_step(step, model):
        emas(step, model)
        if tracker is not None:
            tracker(step, model)

    t = common.Timer()
    summary = train_dit.train(run_dir / "dit", spec=spec, model_config=config, device="cpu", on_step=on_step,
                              log=log, guidance=max(guidances), **train_kw)
    t_train = t()
    clf_summary = train_classifier.train(run_dir / "clf", spec=spec, steps=clf_steps, batch_size=16, device="cpu",
                                         log=lambda *_: None)
    clf = metrics.load_classifier(run_dir / "clf")
    models = {f"ema {summary['settings']['ema']} (saved)": common.load_model(run_dir / "dit" / "model", "cpu")}
    models.update({f"ema {d}": m for d, m in emas.models.items()})
    scores, grids = {}, []
    for label, model in models.items():
        s, vids = metrics.sample_class_scores(model, clf, spec, "cpu", per_class=per_class,
                                              steps=common.SAMPLE_STEPS, guidances=guidances)
        scores[label] = s
        log(f"{name} {label}: " + ", ".join(f"g{g} acc {v['accuracy']:.3f}" for g, v in s.items()))
        if not grids:
            grids = [(g, v) for g, v in vids.items()]
    real, _ = sv.generate(common.HELDOUT_SEED, range(spec.num_classes), spec,
                          labels=sv.balanced_labels(spec.num_classes, spec))
    rows, names = [], []
    for k in range(spec.num_classes):  # first sample of each class: real, then each guidance
        rows.append(real[k])
        names.append(f"{sv.GLYPHS[k]} real")
        for g, v in grids:
            rows.append(v[k])
            names.append(f"{sv.GLYPHS[k]} g{g}")
    sv.save_video_grid(run_dir / "samples.png", rows, row_labels=names, frames=list(range(spec.frames)), scale=3)
    result = {"name": name, "spec": spec.to_dict(), "model_config": config, "train": train_kw,
              "parameters": summary["parameters"], "train_seconds": round(t_train, 1),
              "heldout_fm_loss": summary["heldout_fm_loss"], "class_gain": summary["class_gain"],
              "gain_history": tracker.history if tracker else [], "classifier_heldout": clf_summary["heldout_clean"],
              "sample_scores": scores, "chance": 1 / spec.num_classes, "seconds": round(t(), 1)}
    common.write_json(run_dir / "result.json", result)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--spec", default="{}", help="JSON overrides of the proxy VideoSpec")
    ap.add_argument("--model", default="{}", help="JSON overrides of the proxy model config")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--ema", type=float, default=0.99)
    ap.add_argument("--extra-emas", default="", help="comma-separated extra EMA decays to score")
    ap.add_argument("--cond-dropout", type=float, default=0.1)
    ap.add_argument("--image-batch", type=int, default=0, help="single-frame clips beside each video batch")
    ap.add_argument("--max-minutes", type=float, help="wall-time budget (the schedule follows it)")
    ap.add_argument("--guidances", default="1,2,4,6")
    ap.add_argument("--per-class", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--track-every", type=int, default=0, help="class gain of the live weights every N steps")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_kw = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
                "ema_decay": args.ema, "cond_dropout": args.cond_dropout, "log_every": 10,
                "image_batch": args.image_batch, "max_minutes": args.max_minutes}
    res = proxy_run(args.out, args.name, json.loads(args.spec), json.loads(args.model), train_kw,
                    [float(g) for g in args.guidances.split(",")], args.per_class,
                    [float(e) for e in args.extra_emas.split(",") if e], track_every=args.track_every)
    print(json.dumps({k: res[k] for k in ("name", "heldout_fm_loss", "class_gain", "gain_history", "classifier_heldout",
                                          "sample_scores")}, indent=1))


if __name__ == "__main__":
    main()
