"""SynthVideo: a deterministic generator of short class-labelled videos for the quality benchmark.

Each video shows 1-2 sprites of ONE glyph class (ring, plus, triangle, hollow square, L, T, H, "=")
with random colours, sizes and motions (linear, bouncing, rotating) over a textured, drifting
background.  A DiT conditioned on the class must learn the glyph shape, keep it consistent from frame
to frame and move it plausibly: structure that sparse attention can break.

Videos live directly in a small "latent" space, so no VAE is needed: ``channels`` = RGB + one
object-mask channel, values in [-1, 1], shape (C, F, H, W).  With the defaults (8 frames of
64 x 64) and Wan's patch (1, 2, 2) a sample is 8 x 32 x 32 = 8,192 tokens.  (Until issue 5's
retraining the defaults were 16 frames, 2-3 sprites of half-size 0.13-0.19: that spec is still
rendered bit for bit when given, e.g. from a checkpoint's train_summary.json.)

Determinism: sample ``index`` of stream ``seed`` depends on ``(seed, index)`` only (a SHA-256 derived
torch.Generator draws its parameters; rendering is plain float math), so batches can be made in any
order, on any machine, and the same call gives the same tensor.  Rendering is batched (grid_sample of
every object in every frame at once) and runs on a GPU when given ``device``, without host syncs.

Conditioning: a fixed, seeded (text_len, text_dim) embedding per class, passed to the model as
``encoder_hidden_states`` -- so the model stays a stock ``WanTransformer3DModel`` -- and an all-zero
null embedding for classifier-free guidance.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

GLYPHS = ("ring", "plus", "triangle", "square", "L", "T", "H", "equals")
MOTIONS = ("linear", "bounce", "rotate")
GENERATOR_VERSION = "synthvideo/1"


@dataclass(frozen=True)
class VideoSpec:
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

    def tokens(self, patch=(1, 2, 2)) -> int:
        return (self.frames // patch[0]) * (self.size // patch[1]) * (self.size // patch[2])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VideoSpec":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# --smoke (tests, CPU): 4 frames of 32 x 32 (1,024 tokens), 4 classes.
SMOKE_SPEC = VideoSpec(frames=4, size=32, num_classes=4, glyph_res=32, min_scale=0.22, max_scale=0.32)


# ------------------------------------------------------------------------------------------ glyphs


def _glyph_mask(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Boolean glyph on coordinates x, y in [-1, 1] (y grows downwards)."""
    ax, ay = x.abs(), y.abs()
    if name == "ring":
        r = torch.sqrt(x * x + y * y)
        return (r > 0.5) & (r < 0.85)
    if name == "plus":
        return ((ax < 0.22) & (ay < 0.85)) | ((ay < 0.22) & (ax < 0.85))
    if name == "triangle":  # apex up, base at y = 0.7
        return (y < 0.7) & (y > -0.85) & (ax < (y + 0.85) * 0.62)
    if name == "square":  # hollow
        m = torch.maximum(ax, ay)
        return (m < 0.82) & (m > 0.5)
    if name == "L":
        return ((x > -0.75) & (x < -0.3) & (ay < 0.85)) | ((y > 0.4) & (y < 0.85) & (x > -0.75) & (x < 0.75))
    if name == "T":
        return ((y > -0.85) & (y < -0.4) & (ax < 0.85)) | ((ax < 0.22) & (y > -0.85) & (y < 0.85))
    if name == "H":
        return (((ax > 0.42) & (ax < 0.82)) & (ay < 0.85)) | ((ay < 0.2) & (ax < 0.82))
    if name == "equals":
        return (ay > 0.2) & (ay < 0.6) & (ax < 0.85)
    raise ValueError(f"unknown glyph {name!r}")


def glyph_bank(spec: VideoSpec) -> torch.Tensor:
    """(K, 1, R, R) anti-aliased glyph alpha maps in [0, 1] for the spec's classes."""
    if spec.num_classes > len(GLYPHS):
        raise ValueError(f"at most {len(GLYPHS)} classes")
    ss = 4
    n = spec.glyph_res * ss
    c = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1
    y, x = torch.meshgrid(c, c, indexing="ij")
    masks = torch.stack([_glyph_mask(g, x, y).float() for g in GLYPHS[: spec.num_classes]])
    return F.avg_pool2d(masks[:, None], ss)


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
    return int.from_bytes(hashlib.sha256(f"synthvideo:{seed}:{index}".encode()).digest()[:8], "little") >> 1


def _hsv_to_rgb(h: float, s: float, v: float) -> list[float]:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


@dataclass
class SampleParams:
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


# ------------------------------------------------------------------------------------------ render


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to ``device`` without a stream sync (pinned, non-blocking on CUDA).

    A copy from pageable host memory makes CUDA wait for every queued kernel first, so each small
    parameter upload would stall the host until the previous training step had finished.
    """
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def pack_params(params: Sequence[SampleParams]) -> dict[str, torch.Tensor]:
    """The batch's random choices as a few CPU tensors; objects padded to the batch maximum.

    ``valid`` (B, O) marks real objects; padded ones get scale 1 at the centre and are masked out.
    """
    B, O, T = len(params), max(len(p.motion) for p in params), params[0].cx.shape[1]
    packed = {"cx": torch.zeros(B, O, T), "cy": torch.zeros(B, O, T), "angle": torch.zeros(B, O, T),
              "scale": torch.ones(B, O), "color": torch.zeros(B, O, 3), "valid": torch.zeros(B, O)}
    for b, p in enumerate(params):
        n = len(p.motion)
        for key in ("cx", "cy", "angle", "scale", "color"):
            packed[key][b, :n] = getattr(p, key)
        packed["valid"][b, :n] = 1.0
    packed["label"] = torch.tensor([p.label for p in params], dtype=torch.long)
    bgp = [p.bg for p in params]
    packed["bg_noise"] = torch.stack([bg["noise"] for bg in bgp])  # (B, 3, 4, 4)
    packed["bg_vals"] = torch.tensor([[bg["stripe_dir"], bg["stripe_freq"], bg["stripe_speed"], bg["stripe_amp"]]
                                      for bg in bgp], dtype=torch.float32)  # (B, 4)
    packed["bg_base"] = torch.stack([bg["base"] for bg in bgp])  # (B, 3)
    if params[0].texture is not None:
        packed["bg_fine"] = torch.stack([bg["fine"] for bg in bgp])  # (B, 3, c, c)
        packed["bg_pan"] = torch.stack([bg["pan"] for bg in bgp])  # (B, 2)
        c = params[0].texture.shape[-1]
        packed["obj_tex"] = torch.zeros(B, O, 1, c, c)
        for b, p in enumerate(params):
            packed["obj_tex"][b, : len(p.motion)] = p.texture
    return packed


def _background(pk: dict[str, torch.Tensor], T: int, S: int, device: torch.device) -> torch.Tensor:
    """(B, 3, T, S, S): base colour + low-frequency colour texture + drifting stripes."""
    B = pk["bg_noise"].shape[0]
    coords = (torch.arange(S, dtype=torch.float32, device=device) + 0.5) / S * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    tt = torch.arange(T, dtype=torch.float32, device=device).view(T, 1, 1)
    tex = F.interpolate(pk["bg_noise"], size=(S, S), mode="bicubic", align_corners=False)  # (B, 3, S, S)
    vals = pk["bg_vals"].view(B, 4, 1, 1, 1)
    d, freq, speed, amp = vals[:, 0], vals[:, 1], vals[:, 2], vals[:, 3]  # (B, 1, 1, 1)
    phase = (xx * torch.cos(d) + yy * torch.sin(d)) * freq - speed * tt[None] * 2.0  # (B, T, S, S)
    bg = pk["bg_base"].view(B, 3, 1, 1, 1) + tex[:, :, None] + (amp * torch.sin(phase))[:, None]
    if "bg_fine" in pk:
        bg = bg + _panned_texture(pk["bg_fine"], pk["bg_pan"], T, S)
    return bg


def _panned_texture(fine: torch.Tensor, pan: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """(B, 3, T, S, S): a periodic texture (B, 3, c, c) spanning the frame, shifted by ``pan * t`` in frame t.

    The texture is tiled 3 x 3 so that one period is the middle third of grid_sample's [-1, 1]; the shift
    wraps modulo one period, so the pan never reaches an edge.
    """
    B = fine.shape[0]
    tiled = fine.repeat(1, 1, 3, 3)
    coords = (torch.arange(S, dtype=torch.float32, device=fine.device) + 0.5) / S * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    base = torch.stack([xx, yy], dim=-1) / 3  # (S, S, 2): the frame is the middle period
    tt = torch.arange(T, dtype=torch.float32, device=fine.device).view(1, T, 1, 1, 1)
    shift = torch.remainder(pan.view(B, 1, 1, 1, 2) * tt / 3 + 1 / 3, 2 / 3) - 1 / 3
    grid = (base.view(1, 1, S, S, 2) + shift).view(B * T, S, S, 2)
    src = tiled.repeat_interleave(T, dim=0)  # (B*T, 3, 3c, 3c)
    out = F.grid_sample(src, grid, mode="bicubic", padding_mode="reflection", align_corners=False)
    return out.view(B, T, 3, S, S).transpose(1, 2)


def _object_alpha(pk: dict[str, torch.Tensor], glyphs: torch.Tensor, S: int):
    """Coverage (B, O, T, S, S) of every object in every frame, one grid_sample for the whole batch, and
    the objects' luminance texture on the same grid (None without texture)."""
    B, O, T = pk["cx"].shape
    cx, cy, ang = pk["cx"], pk["cy"], pk["angle"]
    sc = pk["scale"].view(B, O, 1)
    cos, sin = torch.cos(ang), torch.sin(ang)
    # input (glyph) coords = R(-a) (p - c) / s
    theta = torch.stack([
        torch.stack([cos / sc, sin / sc, -(cos * cx + sin * cy) / sc], dim=-1),
        torch.stack([-sin / sc, cos / sc, (sin * cx - cos * cy) / sc], dim=-1),
    ], dim=-2).view(-1, 2, 3)  # (B*O*T, 2, 3)
    src = glyphs[pk["label"]].repeat_interleave(O * T, dim=0)  # (B*O*T, 1, R, R)
    grid = F.affine_grid(theta, (B * O * T, 1, S, S), align_corners=False)
    alpha = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    alpha = alpha.view(B, O, T, S, S) * pk["valid"].view(B, O, 1, 1, 1)
    if "obj_tex" not in pk:
        return alpha, None
    tex = pk["obj_tex"].repeat_interleave(T, dim=1).flatten(0, 1)  # (B*O*T, 1, c, c), in glyph coordinates
    shade = F.grid_sample(tex, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return alpha, shade.view(B, O, T, S, S)


def render(params: Sequence[SampleParams], spec: VideoSpec, device="cpu", glyphs: torch.Tensor | None = None) -> torch.Tensor:
    """Render a batch: (B, C, F, H, W) float32 in [-1, 1] on ``device``.

    The parameters go to the device in one non-blocking upload per tensor, so on a GPU the host
    never waits here and can queue this batch while the previous training step is still running.
    """
    device = torch.device(device)
    glyphs = (glyphs if glyphs is not None else glyph_bank(spec)).to(device)
    pk = {k: to_device(v, device) for k, v in pack_params(params).items()}
    B, O = pk["valid"].shape
    rgb = _background(pk, spec.frames, spec.size, device)  # (B, 3, T, S, S)
    alpha, shade = _object_alpha(pk, glyphs, spec.size)  # (B, O, T, S, S); 0 for padded objects
    mask = torch.zeros_like(rgb[:, :1])
    for o in range(O):  # later objects are drawn on top
        a = alpha[:, o, None]  # (B, 1, T, S, S)
        fill = pk["color"][:, o].view(B, 3, 1, 1, 1)
        if shade is not None:
            fill = fill + shade[:, o, None]
        rgb = rgb * (1 - a) + fill * a
        mask = torch.maximum(mask, a)
    video = torch.cat([rgb.clamp(0, 1), mask], dim=1) * 2 - 1
    return video[:, : spec.channels].contiguous()


def generate(seed: int, indices: Sequence[int], spec: VideoSpec, labels: Sequence[int] | None = None,
             device="cpu", glyphs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Videos (B, C, F, H, W) and labels (B,) of samples ``indices`` of stream ``seed``."""
    params = [sample_params(seed, int(i), spec, None if labels is None else int(labels[j]))
              for j, i in enumerate(indices)]
    video = render(params, spec, device=device, glyphs=glyphs)
    return video, to_device(torch.tensor([p.label for p in params]), video.device)


def balanced_labels(n: int, spec: VideoSpec) -> list[int]:
    return [i % spec.num_classes for i in range(n)]


# ------------------------------------------------------------------------------------------ output


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
    from slaconv.data import write_dataset

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


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """(C, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8 RGB."""
    rgb = video[:3].float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return rgb.permute(1, 2, 3, 0).cpu()


def save_video_grid(path: str | Path, videos: Sequence[torch.Tensor], *, row_labels: Sequence[str] | None = None,
                    frames: Sequence[int] | None = None, scale: int = 2, gap: int = 2) -> Path:
    """A PNG: one row per video, the chosen frames side by side (RGB channels), optional row labels."""
    from PIL import Image, ImageDraw

    videos = [v.detach().cpu() for v in videos]
    nf = videos[0].shape[1]
    frames = list(frames) if frames is not None else list(range(0, nf, max(1, nf // 4)))[:4]
    h, w = videos[0].shape[2] * scale, videos[0].shape[3] * scale
    label_w = 0 if not row_labels else 8 + 7 * max(len(s) for s in row_labels)
    W = label_w + len(frames) * (w + gap)
    H = len(videos) * (h + gap)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, v in enumerate(videos):
        fr = to_uint8_frames(v)
        for c, f in enumerate(frames):
            img = Image.fromarray(fr[f].numpy()).resize((w, h), Image.NEAREST)
            canvas.paste(img, (label_w + c * (w + gap), r * (h + gap)))
        if row_labels:
            draw.text((2, r * (h + gap) + h // 2 - 5), row_labels[r], fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Write a preview PNG of SynthVideo samples (one row per class).")
    ap.add_argument("out", help="PNG path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    spec = SMOKE_SPEC if args.smoke else VideoSpec()
    video, labels = generate(args.seed, range(spec.num_classes), spec, labels=balanced_labels(spec.num_classes, spec))
    save_video_grid(args.out, list(video), row_labels=[GLYPHS[i] for i in labels.tolist()],
                    frames=list(range(0, spec.frames, max(1, spec.frames // 8))))
    print(f"wrote {args.out}: {len(video)} videos {tuple(video.shape[1:])}, {spec.tokens()} tokens each")


if __name__ == "__main__":
    _main()
