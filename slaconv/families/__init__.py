"""Model families slaconv can convert: one module per family, registered here.

A family knows which diffusers class it loads, which attention modules are self-attention, how
to build the SLA2 processor for them, and how to make model inputs for calibration/validation.
Adding a DiT family means adding one module that calls :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    """What slaconv needs to know about one diffusers DiT class to convert, calibrate and validate it."""

    name: str
    class_names: tuple[str, ...]
    """``_class_name`` values in a diffusers ``config.json`` that belong to this family."""
    load_class: Callable[[], type]
    """Returns the diffusers model class (imported lazily)."""
    default_targets: tuple[str, ...]
    """Recipe-style target patterns used when a recipe lists none."""
    make_processor: Callable[..., torch.nn.Module]
    """``make_processor(attn, config, layer_name)``: an SLA2 processor (an ``nn.Module``, identity router) for
    one target attention module, running with ``config`` (an :class:`~slaconv.config.SLA2Config`)."""
    stock_processor: Callable[[], Any]
    """Builds the family's stock processor (used to save plain diffusers weights)."""
    head_shape: Callable[[torch.nn.Module], tuple[int, int]]
    """(heads, head_dim) of an attention module."""
    make_inputs: Callable[..., dict]
    """``make_inputs(model, latents, timestep, prompt_embeds, **extra)`` -> forward kwargs."""
    latent_channels: Callable[[Any], int]
    text_dim: Callable[[Any], int]
    patch_size: Callable[[Any], tuple[int, int, int]]
    pipeline: Callable[[Any], tuple[str, str]]
    """``pipeline(config)``: (diffusers pipeline class, Hub ``pipeline_tag``) that runs a model of this config."""


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make ``family`` known to :func:`get_family` and :func:`detect_family`."""
    _REGISTRY[family.name] = family
    return family


def get_family(name: str) -> Family:
    """The registered family called ``name``, or :class:`UnsupportedModelError`."""
    _load_builtin()
    if name not in _REGISTRY:
        raise UnsupportedModelError(f"unknown model family '{name}' (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def detect_family(config: dict, requested: str = "auto") -> Family:
    """The family of a diffusers model config, or :class:`UnsupportedModelError`."""
    _load_builtin()
    if requested != "auto":
        return get_family(requested)
    class_name = config.get("_class_name")
    for family in _REGISTRY.values():
        if class_name in family.class_names:
            return family
    known = ", ".join(sorted(c for f in _REGISTRY.values() for c in f.class_names))
    raise UnsupportedModelError(f"model class '{class_name}' is not a supported DiT family (supported: {known})")


def _load_builtin() -> None:
    from . import wan  # noqa: F401  (registers itself)
