"""Installing SLA2 processors on a diffusers model, finding them, and switching their mode."""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from collections.abc import Iterable, Iterator

import torch

from .config import SLA2Config
from .errors import RecipeError
from .families import Family, detect_family, get_family
from .processor import MODES, SLA2Processor
from .token_order import check_supported, install_token_order


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern


def resolve_targets(model: torch.nn.Module, family: Family, targets: Iterable[str], ignore: Iterable[str]) -> list[str]:
    """Module paths of the attention layers to convert, in model order.

    ``targets``/``ignore`` hold exact module names or ``re:`` regexes (full match).  Empty targets
    mean the family's default self-attention layers.  A pattern that matches nothing is an error:
    a typo must not silently convert fewer layers than the user asked for.
    """
    patterns = list(targets) or list(family.default_targets)
    ignore = list(ignore)
    names = [name for name, module in model.named_modules() if hasattr(module, "set_processor")]
    for pattern in patterns + ignore:
        if not any(_matches(n, pattern) for n in names):
            raise RecipeError(f"recipe pattern '{pattern}' matches no attention module of this model")
    chosen = [n for n in names if any(_matches(n, p) for p in patterns) and not any(_matches(n, p) for p in ignore)]
    if not chosen:
        raise RecipeError("the recipe's targets and ignore lists leave no layer to convert")
    return chosen


def install_sla2(model: torch.nn.Module, family: Family, layers: list[str],
                 config: SLA2Config) -> dict[str, SLA2Processor]:
    """Put a fresh SLA2 processor (identity router, alpha 0.5) running with ``config`` on each of
    ``layers``; returns them by name.  With ``config.token_tile`` the model's tokens are regrouped into tiles
    (:mod:`slaconv.token_order`) for every layer, converted or not."""
    check_supported(family, config.token_tile)
    modules = dict(model.named_modules())
    installed = {}
    param = next(model.parameters())
    for name in layers:
        attn = modules[name]
        proc = family.make_processor(attn, config, name).to(param.device)
        attn.set_processor(proc)
        installed[name] = proc
    _tell_processors_the_text(model, family, list(installed.values()))
    install_token_order(model, family, config.token_tile)
    return installed


_CONTEXT_HOOK = "_sla2_joint_text_hook"


def _tell_processors_the_text(model: torch.nn.Module, family: Family, procs: list[SLA2Processor]) -> None:
    """Joint-attention families: a forward pre-hook gives every SLA2 processor the call's text (length and real
    tokens), which layers such as Flux's single-stream blocks cannot see themselves.  It runs outside the
    transformer blocks, so compiled blocks read plain values (one host read per forward, not per layer)."""
    old = getattr(model, _CONTEXT_HOOK, None)
    if old is not None:
        old.remove()
    if family.forward_context is None:
        return
    signature = inspect.signature(model.forward)

    def hook(module, args, kwargs):
        context = family.forward_context(signature.bind_partial(*args, **kwargs).arguments)
        for proc in procs:
            proc.joint_text = context

    setattr(model, _CONTEXT_HOOK, model.register_forward_pre_hook(hook, with_kwargs=True))


def sla2_(model: torch.nn.Module, config: SLA2Config | None = None, *, targets: Iterable[str] | None = None,
          ignore: Iterable[str] | None = None, family: Family | str | None = None,
          alpha_init: float = 0.5) -> dict[str, SLA2Processor]:
    """Convert a diffusers transformer in place to SLA2 attention; returns the new processors by layer name.

    Every target self-attention layer gets an :class:`SLA2Processor` running with ``config`` (default
    ``SLA2Config()``): an identity router (SLA's pooled top-k) and every head's sparse/linear ratio
    alpha at ``alpha_init``, the state that ``slaconv calibrate`` starts from.  ``targets`` and ``ignore`` hold module names or
    ``re:<regex>`` patterns (default: the family's self-attention layers); ``family`` is a registered
    family name or :class:`~slaconv.families.Family`, detected from the model's class when omitted.
    A processor in ``dense`` mode (:func:`set_mode`) computes exactly what the stock one does.

    Example::

        from diffusers import WanTransformer3DModel
        import slaconv

        model = WanTransformer3DModel.from_pretrained(repo, subfolder="transformer")
        processors = slaconv.sla2_(model, slaconv.SLA2Config(topk=0.05, quant="none"))
        list(processors)  # ['blocks.0.attn1', 'blocks.1.attn1', ...]
    """
    if not (isinstance(alpha_init, (int, float)) and 0 < alpha_init < 1):
        raise ValueError(f"alpha_init must be in (0, 1), got {alpha_init!r}")
    if family is None:
        family = family_of(model)
    elif isinstance(family, str):
        family = get_family(family)
    layers = resolve_targets(model, family, targets or (), ignore or ())
    installed = install_sla2(model, family, layers, config or SLA2Config())
    with torch.no_grad():
        for proc in installed.values():
            proc.alpha_logit.fill_(math.log(alpha_init / (1 - alpha_init)))
    from .loading import bind_save_pretrained  # loading imports this module

    bind_save_pretrained(model)
    return installed


def family_of(model: torch.nn.Module) -> Family:
    """The family of a diffusers model in memory (its config has no ``_class_name``; its class says the same)."""
    return detect_family({**(getattr(model, "config", None) or {}), "_class_name": type(model).__name__})


def sla2_processors(model: torch.nn.Module) -> dict[str, SLA2Processor]:
    """Installed SLA2 processors keyed by their attention module's path."""
    return {
        name: module.processor
        for name, module in model.named_modules()
        if isinstance(getattr(module, "processor", None), SLA2Processor)
    }


def set_mode(model: torch.nn.Module, mode: str) -> None:
    """Switch every SLA2 processor to ``sla2`` or ``dense`` (stock softmax) attention."""
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
