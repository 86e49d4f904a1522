"""PNG pictures of the quality benchmark, drawn with Pillow: grids of video frames and a line chart."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

LINE_COLOURS = [(52, 101, 164), (204, 102, 0), (78, 154, 6), (117, 80, 123)]
HEADER_HEIGHT = 16  # px above the first row when columns have titles


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """(C, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8 RGB."""
    rgb = video[:3].float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return rgb.permute(1, 2, 3, 0).cpu()


def save_frame_grid(path: str | Path, rows: Sequence[Sequence[torch.Tensor]], frames: Sequence[int], *,
                    row_labels: Sequence[str] | None = None, group_titles: Sequence[str] | None = None,
                    scale: int = 2, gap: int = 2) -> Path:
    """A PNG with one row per entry of ``rows``; each row holds a group of videos (C, F, H, W), every video
    shown as its ``frames`` side by side (RGB channels), groups a little apart.

    ``row_labels`` go left of the rows, ``group_titles`` above the groups' columns.
    """
    rows = [[v.detach().cpu() for v in group] for group in rows]
    h, w = rows[0][0].shape[2] * scale, rows[0][0].shape[3] * scale
    n_groups = max(len(group) for group in rows)
    group_w = len(frames) * (w + gap) + 3 * gap
    label_w = 0 if not row_labels else 8 + 6 * max(len(s) for s in row_labels)
    top = HEADER_HEIGHT if group_titles else 0
    canvas = Image.new("RGB", (label_w + n_groups * group_w - 3 * gap, top + len(rows) * (h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(group_titles or []):
        draw.text((label_w + j * group_w, 2), title, fill=(0, 0, 0))
    for r, group in enumerate(rows):
        y = top + r * (h + gap)
        if row_labels:
            draw.text((2, y + h // 2 - 5), row_labels[r], fill=(0, 0, 0))
        for j, video in enumerate(group):
            pixels = to_uint8_frames(video)
            for i, f in enumerate(frames):
                img = Image.fromarray(pixels[f].numpy()).resize((w, h), Image.NEAREST)
                canvas.paste(img, (label_w + j * group_w + i * (w + gap), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def save_video_grid(path: str | Path, videos: Sequence[torch.Tensor], *, row_labels: Sequence[str] | None = None,
                    frames: Sequence[int] | None = None, scale: int = 2, gap: int = 2) -> Path:
    """A PNG: one row per video, the chosen frames side by side (default: up to 4 spread over the video)."""
    nf = videos[0].shape[1]
    frames = list(frames) if frames is not None else list(range(0, nf, max(1, nf // 4)))[:4]
    return save_frame_grid(path, [[v] for v in videos], frames, row_labels=row_labels, scale=scale, gap=gap)


def line_plot(path: Path, series: dict[str, list[tuple[float, float]]], title: str, *, logy: bool = True) -> None:
    """A small line chart, one line per series of (x, y) points (points with NaN or y <= 0 are left out)."""
    W, H, left, bottom, top, right = 640, 360, 70, 40, 30, 20
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill="black")
    pts = [(x, y) for s in series.values() for x, y in s if y == y and y > 0]
    if not pts:
        img.save(path)
        return
    f = (lambda y: math.log10(y)) if logy else (lambda y: y)
    xmin, xmax = min(p[0] for p in pts), max(p[0] for p in pts)
    ymin, ymax = min(f(p[1]) for p in pts), max(f(p[1]) for p in pts)
    xmax, ymax = (xmax if xmax > xmin else xmin + 1), (ymax if ymax > ymin else ymin + 1e-6)

    def xy(x, y):
        return (left + (x - xmin) / (xmax - xmin) * (W - left - right),
                H - bottom - (f(y) - ymin) / (ymax - ymin) * (H - top - bottom))

    d.line((left, top, left, H - bottom), fill="black")
    d.line((left, H - bottom, W - right, H - bottom), fill="black")
    for frac in (0, 0.5, 1):
        yv = ymin + frac * (ymax - ymin)
        label = f"{10 ** yv:.3g}" if logy else f"{yv:.3g}"
        d.text((4, H - bottom - frac * (H - top - bottom) - 6), label, fill="black")
    d.text((left, H - bottom + 6), f"{xmin:g}", fill="black")
    d.text((W - right - 40, H - bottom + 6), f"{xmax:g}", fill="black")
    for i, (name, s) in enumerate(series.items()):
        c = LINE_COLOURS[i % len(LINE_COLOURS)]
        s = [(x, y) for x, y in s if y == y and y > 0]
        if len(s) > 1:
            d.line([xy(x, y) for x, y in s], fill=c, width=2)
        d.text((W - right - 200, top + 14 * i), name, fill=c)
    img.save(path)
