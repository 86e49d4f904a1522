"""The SynthVideo renderer: glyph bitmaps and batched drawing of sampled parameters into videos.

Every object of every frame of a batch is drawn with one ``grid_sample`` call, on the GPU when one
is given, after a single non-blocking upload of the parameters (no host syncs).  Rendering is plain
float math, so the same parameters give the same tensor on any machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from slaconv.quality.synthvideo import SampleParams, VideoSpec

# The class names, in class-index order; each is a shape drawn by ``_glyph_mask``.
GLYPHS = ("ring", "plus", "triangle", "square", "L", "T", "H", "equals")


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


def render(params: Sequence[SampleParams], spec: VideoSpec, device="cpu",
           glyphs: torch.Tensor | None = None) -> torch.Tensor:
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
