"""The validation report's PNG figures stay readable from 2 to 40 layers and show several heads."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from slaconv.plots import bar_chart, mask_image


def _chart(path, n_layers, name="blocks.{}.attn1"):
    gen = torch.Generator().manual_seed(n_layers)
    labels = [name.format(i) for i in range(n_layers)]
    series = {"attention rel L2": torch.rand(n_layers, generator=gen).tolist(),
              "1 - cosine": (torch.rand(n_layers, generator=gen) * 0.1).tolist()}
    bar_chart(path, labels, series, "per layer")
    return np.asarray(Image.open(path).convert("L"))


def _ink_columns(img):
    """Per column, whether anything is drawn below the x axis (the longest all-dark row)."""
    axis = int(np.argmax((img < 100).sum(axis=1)))
    return (img[axis + 2:] < 128).any(axis=0)


def test_layer_chart_grows_with_layers_and_labels_every_layer(tmp_path):
    small, large = _chart(tmp_path / "a.png", 10), _chart(tmp_path / "b.png", 40)
    assert large.shape[1] > small.shape[1]  # width scales with the layer count
    ink = _ink_columns(large)
    # 40 separate labels: 40 inked column runs under the axis (plus the 'layer' caption's), none merged
    runs = int((ink[1:] & ~ink[:-1]).sum() + ink[0])
    assert runs >= 40, runs


def test_layer_chart_fits_long_labels(tmp_path):
    short = _chart(tmp_path / "a.png", 12, "b{}")
    long = _chart(tmp_path / "b.png", 12, "transformer_blocks.{}.attn1.processor")
    assert long.shape[0] > short.shape[0]  # room for the whole label rather than a clipped one


def test_router_mask_shows_several_heads(tmp_path):
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(4, 6, 9, generator=gen) < 0.3
    mask_image(tmp_path / "one.png", masks[0], "one head")
    mask_image(tmp_path / "four.png", masks, "four heads")
    one, four = (np.asarray(Image.open(tmp_path / n).convert("L")) for n in ("one.png", "four.png"))
    assert four.shape[1] > 3 * (one.shape[1] - 360) and four.shape[1] > one.shape[1]
    # every head's kept blocks are drawn, block for block (16 x 16 pixels each at this size): the legend's swatch
    # is in both images and cancels
    dark = [int((img == 55).sum()) for img in (one, four)]
    assert dark[1] - dark[0] == int(masks[1:].sum()) * 16 * 16
