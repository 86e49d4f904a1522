"""SynthVideo: a deterministic generator of short class-labelled videos for the quality benchmark.

Each video shows 1-2 sprites of ONE glyph class (ring, plus, triangle, hollow square, L, T, H, "=")
with random colours, sizes and motions (linear, bouncing, rotating) over a textured, drifting
background.  A DiT conditioned on the class must learn the glyph shape, keep it consistent from frame
to frame and move it plausibly: structure that sparse attention can break.

Videos live directly in a small "latent" space, so no VAE is needed: ``channels`` = RGB + one
object-mask channel, values in [-1, 1], shape (C, F, H, W).  With the defaults (8 frames of
64 x 64) and Wan's patch (1, 2, 2) a sample is 8 x 32 x 32 = 8,192 tokens.  A spec read from a
checkpoint's train_summary.json (e.g. 16 frames, 2-3 sprites of half-size 0.13-0.19) renders bit for
bit as it did when that checkpoint was trained.

Determinism: sample ``index`` of stream ``seed`` depends on ``(seed, index)`` only (a SHA-256 derived
torch.Generator draws its parameters; :mod:`slaconv.quality.render` draws them with plain float math),
so batches can be made in any order, on any machine, and the same call gives the same tensor.

Conditioning: a fixed, seeded (text_len, text_dim) embedding per class, passed to the model as
``encoder_hidden_states`` -- so the model stays a stock ``WanTransformer3DModel`` -- and an all-zero
null embedding for classifier-free guidance.

    python -m slaconv.quality.synthvideo preview.png [--smoke]     # one video per class, as a PNG
"""

from __future__ import annotations

import argparse
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slaconv.data import write_dataset
from slaconv.quality.images import save_video_grid
from slaconv.quality.render import GLYPHS, glyph_bank, render, to_device
from slaconv.quality.specs import SpecMethods

MOTIONS = ("linear", "bounce", "rotate")
GENERATOR_VERSION = "synthvideo/1"


@dataclass(frozen=True)
class VideoSpec(SpecMethods):
    """Shape and content settings of a SynthVideo stream (everything a sample depends on, with the seed)."""

    frames: int = 8
    size: int = 64  # H = W in pixels
    channels: int = 4  # RGB + object mask
    num_classes: int = 8
    min_objects: int = 1
    max_objects: int = 2
    glyph_res: int = 48  # glyph bitmap resolution (rendered 4x supersampled, then pooled)
    min_scale: float = 0.22  # glyph half-size as a fraction of the frame (0.22-0.32: 28-41 px, 14-20 tokens wide)
    max_scale: float = 0.32
    text_len: int = 4  # class embedding tokens (S)
    text_dim: int = 32  # class embedding width (D)
    embed_seed: int = 1234
    # Fine texture (0 = the flat look of the shipped checkpoint, rendered bit for bit): amplitude of a
    # high-frequency colour texture that pans across the background and of a luminance texture that moves
    # and turns with each sprite.  Flat regions make every token of a region an equally good key, so a
    # denoiser averages over all of them (diffuse attention); texture gives each point one match per frame.
    texture: float = 0.0
    texture_cells: int = 16  # texture grid cells across the frame (16: features of ~2 tokens at 64 px, patch 2)



# --smoke (tests, CPU): 4 frames of 32 x 32 (1,024 tokens), 4 classes.
SMOKE_SPEC = VideoSpec(frames=4, size=32, num_classes=4, glyph_res=32, min_scale=0.22, max_scale=0.32)


# ------------------------------------------------------------------------------------------ conditioning


def class_embeddings(spec: VideoSpec) -> torch.Tensor:
    """(K, S, D) fixed conditioning embeddings: seeded Gaussian tokens, one set per class."""
    gen = torch.Generator().manual_seed(spec.embed_seed)
    return torch.randn(spec.num_classes, spec.text_len, spec.text_dim, generator=gen)


def null_embedding(spec: VideoSpec) -> torch.Tensor:
    """(S, D) zeros: the "no class" conditioning of classifier-free guidance.

    Training replaces a share of the class embeddings by it (conditioning dropout); samplers query
    the model with it for the unconditional half of a guided step.  It is an ordinary
    ``encoder_hidden_states`` value, so the model stays a stock ``WanTransformer3DModel``.
    """
    return torch.zeros(spec.text_len, spec.text_dim)


# ------------------------------------------------------------------------------------------ params


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` of stream ``seed`` (a SHA-256 hash of both)."""
    return int.from_bytes(hashlib.sha256(f"synthvideo:{seed}:{index}".encode()).digest()[:8], "little") >> 1


def _hsv_to_rgb(h: float, s: float, v: float) -> list[float]:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


@dataclass
class SampleParams:
    """The random choices of one video: its label, per-object trajectories and looks, the background."""

    label: int
    # per object: (O,) or (O, F) tensors
    cx: torch.Tensor = field(default=None)  # (O, F) centre x in [-1, 1]
    cy: torch.Tensor = field(default=None)
    angle: torch.Tensor = field(default=None)  # (O, F) radians
    scale: torch.Tensor = field(default=None)  # (O,) half-size in normalised units
    color: torch.Tensor = field(default=None)  # (O, 3) in [0, 1]
    motion: list = field(default_factory=list)
    bg: dict = field(default_factory=dict)
    texture: torch.Tensor | None = None  # (O, 1, c, c) luminance texture in glyph coordinates (spec.texture > 0)


def _bounce(p: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Reflect positions into [lo, hi] (a triangle wave)."""
    span = hi - lo
    u = torch.remainder(p - lo, 2 * span)
    return lo + torch.where(u > span, 2 * span - u, u)


def sample_params(seed: int, index: int, spec: VideoSpec, label: int | None = None) -> SampleParams:
    """The random choices of sample ``index`` of stream ``seed`` (label drawn unless given)."""
    g = torch.Generator().manual_seed(sample_seed(seed, index))

    def u(a=0.0, b=1.0, *shape):
        return a + (b - a) * torch.rand(*(shape or (1,)), generator=g)

    drawn_label = int(torch.randint(spec.num_classes, (1,), generator=g))
    label = drawn_label if label is None else int(label)
    n_obj = int(torch.randint(spec.min_objects, spec.max_objects + 1, (1,), generator=g))
    t = torch.arange(spec.frames, dtype=torch.float32)
    cxs, cys, angs, scales, colors, motions = [], [], [], [], [], []
    for _ in range(n_obj):
        scale = float(u(spec.min_scale, spec.max_scale)) * 2  # in normalised [-1, 1] units
        lim = 1.0 - scale * 0.75
        motion = MOTIONS[int(torch.randint(len(MOTIONS), (1,), generator=g))]
        x0, y0 = float(u(-lim, lim)), float(u(-lim, lim))
        a0 = float(u(-0.35, 0.35))
        if motion == "linear":
            x1, y1 = float(u(-lim, lim)), float(u(-lim, lim))
            frac = t / max(spec.frames - 1, 1)
            cx, cy = x0 + (x1 - x0) * frac, y0 + (y1 - y0) * frac
            ang = torch.full_like(t, a0)
        elif motion == "bounce":
            speed = float(u(0.12, 0.25)) * 16 / max(spec.frames, 1)
            theta = float(u(0, 2 * math.pi))
            cx = _bounce(x0 + speed * math.cos(theta) * t, -lim, lim)
            cy = _bounce(y0 + speed * math.sin(theta) * t, -lim, lim)
            ang = torch.full_like(t, a0)
        else:  # rotate, with a slow drift
            omega = float(u(0.12, 0.3)) * (1 if float(u()) < 0.5 else -1) * 16 / max(spec.frames, 1)
            dx, dy = float(u(-0.02, 0.02)), float(u(-0.02, 0.02))
            cx = (x0 + dx * t).clamp(-lim, lim)
            cy = (y0 + dy * t).clamp(-lim, lim)
            ang = a0 + omega * t
        hue, sat, val = float(u()), float(u(0.55, 1.0)), float(u(0.7, 1.0))
        cxs.append(cx), cys.append(cy), angs.append(ang), scales.append(scale)
        colors.append(torch.tensor(_hsv_to_rgb(hue, sat, val)))
        motions.append(motion)
    bg = {
        "base": torch.tensor(_hsv_to_rgb(float(u()), float(u(0.2, 0.6)), float(u(0.15, 0.35)))),
        "stripe_freq": float(u(2.0, 5.0)) * math.pi,
        "stripe_dir": float(u(0, 2 * math.pi)),
        "stripe_speed": float(u(-0.4, 0.4)),
        "stripe_amp": float(u(0.04, 0.12)),
        "noise": torch.randn(3, 4, 4, generator=g) * 0.08,  # low-frequency colour texture
    }
    obj_tex = None
    if spec.texture > 0:  # drawn after everything else, so texture=0 streams stay unchanged
        c = spec.texture_cells
        bg["fine"] = torch.randn(3, c, c, generator=g) * spec.texture
        bg["pan"] = (torch.rand(2, generator=g) * 2 - 1) * 0.06  # normalised units per frame (<= ~1 token)
        obj_tex = torch.randn(n_obj, 1, c // 2, c // 2, generator=g) * spec.texture
    return SampleParams(label=label, cx=torch.stack(cxs), cy=torch.stack(cys), angle=torch.stack(angs),
                        scale=torch.tensor(scales), color=torch.stack(colors), motion=motions, bg=bg,
                        texture=obj_tex)


# ------------------------------------------------------------------------------------------ videos


def generate(seed: int, indices: Sequence[int], spec: VideoSpec, labels: Sequence[int] | None = None,
             device="cpu", glyphs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Videos (B, C, F, H, W) and labels (B,) of samples ``indices`` of stream ``seed``."""
    params = [sample_params(seed, int(i), spec, None if labels is None else int(labels[j]))
              for j, i in enumerate(indices)]
    video = render(params, spec, device=device, glyphs=glyphs)
    return video, to_device(torch.tensor([p.label for p in params]), video.device)


def balanced_labels(n: int, spec: VideoSpec) -> list[int]:
    """``n`` labels cycling through the classes: 0, 1, ..., K-1, 0, 1, ..."""
    return [i % spec.num_classes for i in range(n)]


def null_rounds(num_samples: int, spec: VideoSpec, null_every: int) -> list[bool]:
    """Which samples carry the null embedding: every ``null_every``-th round of the classes (0 = none).

    Samples are labelled ``i % num_classes``, so whole rounds keep every class equally represented.
    """
    if null_every <= 0:
        return [False] * num_samples
    return [(i // spec.num_classes) % null_every == null_every - 1 for i in range(num_samples)]


def write_slaconv_dataset(out_dir: str | Path, seed: int, num_samples: int, spec: VideoSpec,
                          dtype: torch.dtype = torch.float32, chunk: int = 32, null_every: int = 0) -> Path:
    """Write ``num_samples`` videos (balanced classes) in slaconv's ``--data`` format.

    ``latents`` = the video (C, F, H, W), ``prompt_embeds`` = its class embedding (S, D), or the
    null embedding for the rounds picked by :func:`null_rounds` (what a guided sampler also asks).
    """
    emb = class_embeddings(spec)
    null_emb = null_embedding(spec)
    glyphs = glyph_bank(spec)
    labels = balanced_labels(num_samples, spec)
    nulls = null_rounds(num_samples, spec, null_every)
    samples = []
    for start in range(0, num_samples, chunk):
        idx = list(range(start, min(start + chunk, num_samples)))
        video, lab = generate(seed, idx, spec, labels=[labels[i] for i in idx], glyphs=glyphs)
        for i, v, y in zip(idx, video, lab.tolist()):
            samples.append({"latents": v.to(dtype), "prompt_embeds": (null_emb if nulls[i] else emb[y]).to(dtype)})
    return write_dataset(out_dir, samples, source="synthvideo", seed=seed,
                         extra={"generator": GENERATOR_VERSION, "spec": spec.to_dict(), "labels": labels,
                                "null_embedding": nulls})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Write a preview PNG of SynthVideo samples (one row per class).")
    ap.add_argument("out", help="PNG path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="the small spec of the CPU tests")
    args = ap.parse_args(argv)
    spec = SMOKE_SPEC if args.smoke else VideoSpec()
    video, labels = generate(args.seed, range(spec.num_classes), spec, labels=balanced_labels(spec.num_classes, spec))
    save_video_grid(args.out, list(video), row_labels=[GLYPHS[i] for i in labels.tolist()],
                    frames=list(range(0, spec.frames, max(1, spec.frames // 8))))
    print(f"wrote {args.out}: {len(video)} videos {tuple(video.shape[1:])}, {spec.tokens()} tokens each")


if __name__ == "__main__":
    main()
