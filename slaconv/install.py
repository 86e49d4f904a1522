"""Installing SLA2 processors on a diffusers model, finding them, and switching their mode."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

from .errors import RecipeError
from .families import Family
from .processor import MODES, SLA2Processor


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern


def resolve_targets(model: torch.nn.Module, family: Family, targets: list[str], ignore: list[str]) -> list[str]:
    """Module paths of the attention layers to convert, in model order.

    ``targets``/``ignore`` hold exact module names or ``re:`` regexes (full match).  Empty targets
    mean the family's default self-attention layers.  A pattern that matches nothing is an error:
    a typo must not silently convert fewer layers than the user asked for.
    """
    patterns = list(targets) or list(family.default_targets)
    names = [name for name, module in model.named_modules() if hasattr(module, "set_processor")]
    for pattern in patterns + list(ignore):
        if not any(_matches(n, pattern) for n in names):
            raise RecipeError(f"recipe pattern '{pattern}' matches no attention module of this model")
    chosen = [n for n in names if any(_matches(n, p) for p in patterns) and not any(_matches(n, p) for p in ignore)]
    if not chosen:
        raise RecipeError("the recipe's targets and ignore lists leave no layer to convert")
    return chosen


def install_sla2(
    model: torch.nn.Module,
    family: Family,
    layers: list[str],
    *,
    topk: float,
    block_q: int,
    block_k: int,
    quant: str,
    topk_per_layer: dict[str, float] | None = None,
) -> dict[str, SLA2Processor]:
    """Put a fresh SLA2 processor (identity router) on each of ``layers``; returns them by name."""
    modules = dict(model.named_modules())
    installed = {}
    param = next(model.parameters())
    for name in layers:
        attn = modules[name]
        proc = family.make_processor(attn).to(param.device)
        proc.topk = (topk_per_layer or {}).get(name, topk)
        proc.block_q, proc.block_k, proc.quant = block_q, block_k, quant
        proc.layer_name = name
        attn.set_processor(proc)
        installed[name] = proc
    return installed


def sla2_processors(model: torch.nn.Module) -> dict[str, SLA2Processor]:
    """Installed SLA2 processors keyed by their attention module's path."""
    return {
        name: module.processor
        for name, module in model.named_modules()
        if isinstance(getattr(module, "processor", None), SLA2Processor)
    }


def set_mode(model: torch.nn.Module, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    for proc in sla2_processors(model).values():
        proc.mode = mode


@contextlib.contextmanager
def stock_processors(model: torch.nn.Module, family: Family) -> Iterator[None]:
    """Temporarily put the stock processors back (e.g. to save plain diffusers weights)."""
    procs = sla2_processors(model)
    modules = dict(model.named_modules())
    try:
        for name in procs:
            modules[name].set_processor(family.stock_processor())
        yield
    finally:
        for name, proc in procs.items():
            modules[name].set_processor(proc)
