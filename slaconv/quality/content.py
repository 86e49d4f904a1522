"""The benchmark's two video sources behind one interface: SynthVideo glyphs and PhotoVideo photographs.

A spec says which source it belongs to (:class:`PhotoSpec` carries ``source = "photos"``; a saved spec
without that key is a SynthVideo one, so older checkpoints load unchanged).  Code that only needs videos,
labels and their conditioning (training, held-out metrics, attention statistics) goes through here.
"""

from __future__ import annotations

import dataclasses

import torch

from slaconv.quality import photovideo as pv
from slaconv.quality import synthvideo as sv
from slaconv.quality.render import GLYPHS

Spec = sv.VideoSpec | pv.PhotoSpec


def is_photos(spec: Spec) -> bool:
    """True for a PhotoVideo spec."""
    return isinstance(spec, pv.PhotoSpec)


def spec_from_dict(d: dict) -> Spec:
    """The spec a saved dict describes (``source: photos`` -> PhotoSpec, else VideoSpec)."""
    return pv.PhotoSpec.from_dict(d) if d.get("source") == "photos" else sv.VideoSpec.from_dict(d)


def assets(spec: Spec, device="cpu"):
    """What rendering needs, loaded once: the glyph bank or the resized photos, on ``device``."""
    return pv.photo_bank(spec, device) if is_photos(spec) else sv.glyph_bank(spec).to(device)


def generate(seed: int, indices, spec: Spec, labels=None, device="cpu", loaded=None):
    """Videos (B, C, F, H, W) in [-1, 1] and labels (B,) of samples ``indices`` of stream ``seed``."""
    if is_photos(spec):
        return pv.generate(seed, indices, spec, labels=labels, device=device, bank=loaded)
    return sv.generate(seed, indices, spec, labels=labels, device=device, glyphs=loaded)


def class_embeddings(spec: Spec) -> torch.Tensor:
    """(num_classes, text_len, text_dim) conditioning table."""
    return pv.class_embeddings(spec) if is_photos(spec) else sv.class_embeddings(spec)


def null_embedding(spec: Spec) -> torch.Tensor:
    """(text_len, text_dim) zeros, the unconditional input."""
    return pv.null_embedding(spec) if is_photos(spec) else sv.null_embedding(spec)


def label_name(spec: Spec, label: int) -> str:
    """A short caption of a label (glyph name, or photo and motion)."""
    return pv.label_name(spec, label) if is_photos(spec) else GLYPHS[int(label)]


def preview_labels(spec: Spec) -> list[int]:
    """Labels requested for preview grids: every class of SynthVideo; one video per motion of PhotoVideo."""
    return list(range(len(pv.MOTIONS) if is_photos(spec) else spec.num_classes))


def spec_with(smoke: bool, overrides: dict) -> Spec:
    """The default spec (``smoke``: the small CPU one) of the source ``overrides["source"]`` names, overridden.

    ``{"source": "photos", "frames": 16}`` is a 16-frame PhotoVideo spec; without ``source``, SynthVideo.
    """
    overrides = dict(overrides)
    if overrides.pop("source", "glyphs") == "photos":
        base = pv.SMOKE_PHOTO_SPEC if smoke else pv.PhotoSpec()
    else:
        base = sv.SMOKE_SPEC if smoke else sv.VideoSpec()
    return dataclasses.replace(base, **overrides)
