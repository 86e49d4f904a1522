"""Model families slaconv can convert: one module per family, registered here.

A family knows which diffusers class it loads, which attention modules are self-attention, how
to build the SLA2 processor for them, and how to make model inputs for calibration/validation.
Adding a DiT family means adding one module that calls :func:`register`.
"""

from __future__ import annotations

import importlib
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
    """``_class_name`` values in a diffusers ``config.json`` that belong to this family; the first is the class
    :meth:`load_class` returns."""
    default_targets: tuple[str, ...]
    """Recipe-style target patterns used when a recipe lists none."""
    processor: type
    """The family's :class:`~slaconv.processor.SLA2Processor` subclass."""
    stock_processor_path: str
    """Dotted path of the family's stock processor class (it replaces SLA2 to save plain diffusers weights)."""
    head_shape: Callable[[torch.nn.Module], tuple[int, int]]
    """(heads, head_dim) of an attention module."""
    make_inputs: Callable[..., dict]
    """``make_inputs(model, latents, timestep, prompt_embeds, **conditioning)`` -> forward kwargs: ``latents``
    (B, C, F, H, W) noised by flow matching at ``timestep`` = 1000 * sigma, and the sample's other tensors
    (``image_embeds``, ``pooled_embeds``, ``prompt_mask``) where the data holds them."""
    latent_channels: Callable[[Any], int]
    text_dim: Callable[[Any], int]
    patch_size: Callable[[Any], tuple[int, int, int]]
    pipeline: Callable[[Any], tuple[str, str]]
    """``pipeline(config)``: (diffusers pipeline class, Hub ``pipeline_tag``) that runs a model of this config."""
    read_output: Callable[..., torch.Tensor] = lambda model, output, latents, timestep: output
    """``read_output(model, output, latents, timestep)``: the model's output for :attr:`make_inputs`' arguments as
    the flow-matching velocity ``noise - x0`` in the latents' (B, C, F, H, W) layout."""
    pooled_dim: Callable[[Any], int | None] = lambda config: None
    """Width of the pooled text embedding the model is conditioned on (``pooled_embeds``), or None."""
    text_mask: bool = False
    """The model takes a text attention mask (``prompt_mask``, 1 for real tokens, 0 for padding)."""
    forward_context: Callable[[dict], Any] | None = None
    """Joint-attention families: from the model's forward arguments (by name), the
    :class:`~slaconv.processor.JointText` every SLA2 processor is told before the blocks run."""
    check_target: Callable[[torch.nn.Module, str], None] | None = None
    """``check_target(attn, layer_name)`` raises for an attention module that must not be converted."""
    reorder_tokens: Callable[[torch.nn.Module, Any], list] | None = None
    """``reorder_tokens(model, order)`` registers the forward hooks that put the video tokens in the
    :class:`~slaconv.token_order.TokenOrder` ``order`` and back, returning their handles; None where the family
    keeps raster order (``sla2.token_tile`` unset)."""

    def load_class(self) -> type:
        """The diffusers model class (imported on the first call)."""
        return getattr(importlib.import_module("diffusers"), self.class_names[0])

    def stock_processor(self) -> Any:
        """A new stock processor of this family."""
        module, _, name = self.stock_processor_path.rpartition(".")
        return getattr(importlib.import_module(module), name)()

    def make_processor(self, attn: torch.nn.Module, config, layer_name: str) -> torch.nn.Module:
        """A fresh SLA2 processor (identity router) for one target attention module, running with ``config``
        (an :class:`~slaconv.config.SLA2Config`)."""
        if self.check_target is not None:
            self.check_target(attn, layer_name)
        heads, head_dim = self.head_shape(attn)
        return self.processor(heads, head_dim, config, layer_name=layer_name)


def heads_of_inner_dim(attn: torch.nn.Module) -> tuple[int, int]:
    """(heads, head_dim) of an attention module that records its inner dim (legacy ``Attention``, Wan)."""
    return attn.heads, attn.inner_dim // attn.heads


def heads_of_head_dim(attn: torch.nn.Module) -> tuple[int, int]:
    """(heads, head_dim) of an attention module that records its head dim (Flux, LTX-Video)."""
    return attn.heads, attn.head_dim


DOUBLE_AND_SINGLE_STREAM = (r"re:transformer_blocks\.\d+\.attn", r"re:single_transformer_blocks\.\d+\.attn")
"""Default targets of the MMDiT families (Flux, HunyuanVideo): the joint attention of every double-stream
(``transformer_blocks``) and single-stream (``single_transformer_blocks``) block."""

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
    from . import cogvideox, flux, hunyuan_video, ltx_video, wan  # noqa: F401  (each registers itself)
