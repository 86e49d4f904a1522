"""Small PNG figures for validation reports, drawn with Pillow (a diffusers dependency)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

COLOURS = ((52, 101, 164), (204, 102, 0), (78, 154, 6), (117, 80, 123))
LINE = 14
"""Height of one line of Pillow's default font, in pixels (also the narrowest a labelled bar group may be)."""


def _vertical_text(img: Image.Image, xy: tuple[int, int], text: str) -> None:
    """``text`` turned 90 degrees counter-clockwise, its end at ``xy`` (reads bottom to top, ends at the axis)."""
    box = ImageDraw.Draw(img).textbbox((0, 0), text)
    label = Image.new("RGB", (box[2] + 2, LINE), "white")
    ImageDraw.Draw(label).text((0, 0), text, fill="black")
    img.paste(label.rotate(90, expand=True), xy)


def _legend(draw: ImageDraw.ImageDraw, x: int, y: int, entries: list[tuple[tuple[int, int, int], str]]) -> None:
    for j, (colour, name) in enumerate(entries):
        draw.rectangle((x, y + LINE * j + 2, x + 10, y + LINE * j + 12), fill=colour, outline="black")
        draw.text((x + 16, y + LINE * j), name, fill="black")


def bar_chart(path: Path, labels: list[str], series: dict[str, list[float]], title: str) -> None:
    """Grouped vertical bars, one group per label, one colour per series; y from 0 to the max.

    The figure widens with the number of labels (every group at least a text line wide) and the labels stand
    vertically under their groups, so that 40 layers stay readable; the legend sits above the plot."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_len = max([probe.textbbox((0, 0), label)[2] for label in labels] + [0])
    group_w = max(LINE + 4, 10 * len(series))
    left, right, top = 60, 20, 26 + LINE * len(series)
    bottom = label_len + 30
    width = max(480, left + right + group_w * len(labels))
    plot_h = 220
    height = top + plot_h + bottom
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 4), title, fill="black")
    _legend(draw, left, 20, [(COLOURS[j % len(COLOURS)], name) for j, name in enumerate(series)])
    values = [v for vals in series.values() for v in vals if v == v]
    vmax = max(values + [1e-12])
    axis_y = top + plot_h
    draw.line((left, top, left, axis_y), fill="black")
    draw.line((left, axis_y, width - right, axis_y), fill="black")
    for frac in (0.0, 0.5, 1.0):
        y = axis_y - frac * plot_h
        draw.text((4, y - 6), f"{vmax * frac:.3g}", fill="black")
    group_w = (width - left - right) / max(len(labels), 1)
    bar_w = (group_w - 4) / max(len(series), 1)
    for i, label in enumerate(labels):
        x0 = left + 2 + i * group_w
        for j, vals in enumerate(series.values()):
            v = vals[i] if vals[i] == vals[i] else 0.0
            h = plot_h * max(v, 0.0) / vmax  # the axis starts at 0 (e.g. 1 - cosine is -1e-7 for exact attention)
            draw.rectangle((x0 + j * bar_w, axis_y - h, x0 + (j + 1) * bar_w - 1, axis_y), fill=COLOURS[j % len(COLOURS)])
        text_w = probe.textbbox((0, 0), label)[2]
        _vertical_text(img, (int(x0 + group_w / 2 - LINE / 2), axis_y + 4 + label_len - text_w), label)
    draw.text((left, height - LINE - 2), "layer", fill="black")
    img.save(path)


def mask_image(path: Path, mask: torch.Tensor, title: str, scale: int | None = None) -> None:
    """Block masks as a PNG: (n_qblocks, n_kblocks) for one head or (heads, n_qblocks, n_kblocks) for a row of
    heads, each panel with query blocks down and key blocks across; kept blocks (exact softmax) dark, the
    blocks left to the linear branch light."""
    m = mask.float().cpu()
    m = m[None] if m.dim() == 2 else m
    heads, nq, nk = m.shape
    scale = scale or max(2, min(16, 256 // max(nq, nk)))
    gap, left, top = 16, 22, 40 + 2 * LINE
    panel_w, panel_h = nk * scale, nq * scale
    width = max(left + heads * (panel_w + gap), 360)
    axis_label = "<- query block"
    label_len = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), axis_label)[2]
    img = Image.new("RGB", (width, top + max(panel_h + LINE + 8, label_len + 4)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), title, fill="black")
    _legend(draw, 4, 20, [((55, 55, 55), "kept key block: exact softmax (sparse branch)"),
                          ((255, 255, 255), "other key blocks: linear branch")])
    for h in range(heads):
        pixels = (255 - (m[h] * 200).to(torch.uint8)).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        x = left + h * (panel_w + gap)
        img.paste(Image.fromarray(pixels.numpy(), mode="L").convert("RGB"), (x, top))
        draw.rectangle((x - 1, top - 1, x + panel_w, top + panel_h), outline="black")
        draw.text((x, top - LINE), f"head {h}", fill="black")
        draw.text((x, top + panel_h + 4), "key block ->", fill="black")
    _vertical_text(img, (4, top), axis_label)
    img.save(path)


def line_chart(path: Path, x_labels: list[str], series: dict[str, list[tuple[float, float, float] | None]],
               hlines: dict[str, float], title: str, x_title: str) -> None:
    """One line per series over the categorical ``x_labels``, each point ``(value, low, high)`` drawn with an
    interval bar (``None``: no point), and labelled horizontal reference lines; the y axis spans every value."""
    colours = [COLOURS[j % len(COLOURS)] if j < len(COLOURS) else
               ((37 * j) % 200, (91 * j) % 200, (151 * j) % 200) for j in range(len(series) + len(hlines))]
    entries = [*series, *hlines]
    left, right, top, plot_h, plot_w = 70, 20, 26 + LINE * len(entries), 260, max(360, 110 * len(x_labels))
    width, height = left + plot_w + right, top + plot_h + 2 * LINE + 12
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 4), title, fill="black")
    _legend(draw, left, 20, list(zip(colours, entries)))
    values = [v for points in series.values() for p in points if p is not None for v in p] + list(hlines.values())
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    axis_y = top + plot_h

    def y_of(v: float) -> float:
        return axis_y - plot_h * (v - lo) / (hi - lo)

    draw.line((left, top, left, axis_y), fill="black")
    draw.line((left, axis_y, left + plot_w, axis_y), fill="black")
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        v = lo + frac * (hi - lo)
        draw.text((4, y_of(v) - 6), f"{v:.4g}", fill="black")
    step = plot_w / max(len(x_labels), 1)
    for i, label in enumerate(x_labels):
        draw.text((left + step * (i + 0.5) - 3 * len(label), axis_y + 4), label, fill="black")
    for j, v in enumerate(hlines.values()):
        colour = colours[len(series) + j]
        for x in range(left, left + plot_w, 8):  # dashed
            draw.line((x, y_of(v), x + 4, y_of(v)), fill=colour, width=2)
    for j, points in enumerate(series.values()):
        colour, offset = colours[j], (j - (len(series) - 1) / 2) * 4  # spread the bars of one label apart
        xy = []
        for i, point in enumerate(points):
            if point is None:
                continue
            x = left + step * (i + 0.5) + offset
            value, low, high = point
            draw.line((x, y_of(low), x, y_of(high)), fill=colour, width=1)
            draw.line((x - 3, y_of(low), x + 3, y_of(low)), fill=colour)
            draw.line((x - 3, y_of(high), x + 3, y_of(high)), fill=colour)
            xy.append((x, y_of(value)))
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    draw.text((left + plot_w - 6 * len(x_title), height - LINE - 2), x_title, fill="black")
    img.save(path)
