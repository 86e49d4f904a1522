"""Small PNG figures for validation reports, drawn with Pillow (a diffusers dependency)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw


def bar_chart(path: Path, labels: list[str], series: dict[str, list[float]], title: str) -> None:
    """Grouped vertical bars, one group per label, one colour per series; y from 0 to the max."""
    colours = [(52, 101, 164), (204, 102, 0), (78, 154, 6), (117, 80, 123)]
    width, height, left, bottom, top = max(480, 40 + 28 * len(labels) * len(series)), 320, 60, 70, 30
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), title, fill="black")
    values = [v for vals in series.values() for v in vals if v == v]
    vmax = max(values + [1e-12])
    plot_h = height - bottom - top
    draw.line((left, top, left, height - bottom), fill="black")
    draw.line((left, height - bottom, width - 10, height - bottom), fill="black")
    for frac in (0.0, 0.5, 1.0):
        y = height - bottom - frac * plot_h
        draw.text((4, y - 6), f"{vmax * frac:.3g}", fill="black")
    group_w = (width - left - 20) / max(len(labels), 1)
    bar_w = group_w / (len(series) + 1)
    for i, label in enumerate(labels):
        x0 = left + 10 + i * group_w
        for j, vals in enumerate(series.values()):
            v = vals[i] if vals[i] == vals[i] else 0.0
            h = plot_h * max(v, 0.0) / vmax  # the axis starts at 0 (e.g. 1 - cosine is -1e-7 for exact attention)
            draw.rectangle((x0 + j * bar_w, height - bottom - h, x0 + (j + 1) * bar_w - 2, height - bottom),
                           fill=colours[j % len(colours)])
        draw.text((x0, height - bottom + 4 + 12 * (i % 3)), label[-14:], fill="black")
    for j, name in enumerate(series):
        draw.rectangle((width - 170, 10 + 14 * j, width - 160, 20 + 14 * j), fill=colours[j % len(colours)])
        draw.text((width - 155, 8 + 14 * j), name, fill="black")
    img.save(path)


def mask_image(path: Path, mask: torch.Tensor, title: str, scale: int | None = None) -> None:
    """A block mask (n_qblocks, n_kblocks), 1 = sparse (dark), 0 = linear (light), as a PNG."""
    m = mask.float().cpu()
    nq, nk = m.shape
    scale = scale or max(1, min(16, 512 // max(nq, nk)))
    pixels = (255 - (m * 200).to(torch.uint8)).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    body = Image.fromarray(pixels.numpy(), mode="L").convert("RGB")
    img = Image.new("RGB", (max(body.width, 300), body.height + 24), "white")
    img.paste(body, (0, 24))
    ImageDraw.Draw(img).text((4, 4), title, fill="black")
    img.save(path)
