"""``slaconv convert``: load a diffusers transformer, install SLA2 on the target layers, save.

The router starts as the identity (SLA's pooled top-k router); alpha starts, per head, at the
full-attention probability mass the initial mask selects, measured on one calibration pass
(``sla2.alpha_init: calibrate``), or at a fixed value from the recipe.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from .budget import measure_mass_curves, per_layer_budget
from .config import KERNEL_HEAD_DIMS
from .errors import InputError
from .families import detect_family
from .inputs import batches, check_latent_shape, denoiser_forward
from .install import install_sla2, resolve_targets, sla2_, sla2_processors
from .kernels import reference
from .observe import observing
from .recipe import Recipe
from .source import ModelSource, content_hash, load_model, resolve_model, sla_checkpoint_info
from .token_order import check_supported
from .utils.devices import DTYPES
from .utils.files import atomic_dir
from .workdir import WorkDir, new_config

logger = logging.getLogger(__name__)


def refuse_converted(source: ModelSource, model: str) -> None:
    """:class:`InputError` when ``source`` is already an SLA2 model (a work dir, or a package's weights, which
    hold ``sla2.safetensors``): converting it again would silently drop its router, alpha and recipe."""
    if not (WorkDir.is_workdir(source.path) or (source.path / WorkDir.SLA2_STATE).is_file()):
        return
    base = None
    if WorkDir.is_workdir(source.path):
        info = WorkDir(source.path).read_sla2_config().base_model or {}
        base = info.get("id") or WorkDir(source.path).read_local().get("base_path")
    original = f"its original model ({base})" if base else "its original model"
    raise InputError(f"{model} is already an SLA2 model: train it further with 'slaconv calibrate {model}', "
                     f"or convert {original} to start over")


def skeleton(source: ModelSource, family) -> torch.nn.Module:
    """The model of ``source`` built without weights (its modules and shapes only)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return family.load_class().from_config(source.config)


def refuse_kernel_shapes(source: ModelSource, family, recipe: Recipe, device: str) -> None:
    """On a GPU, an :class:`InputError` naming the first target layer whose head dim the Triton kernels do not
    take, before any weight loads (on the CPU every head dim runs the PyTorch reference, as all calls do there)."""
    if not str(device).startswith("cuda"):
        return
    net = skeleton(source, family)
    modules = dict(net.named_modules())
    for name in resolve_targets(net, family, recipe.sla2.targets, recipe.sla2.ignore):
        heads, head_dim = family.head_shape(modules[name])
        if head_dim not in KERNEL_HEAD_DIMS:
            raise InputError(f"{name} has {heads} heads of head dim {head_dim}; the SLA2 kernels take head dims "
                             f"{', '.join(map(str, KERNEL_HEAD_DIMS))} (convert with --device cpu to run the "
                             "PyTorch reference instead)")


def plan(model: str, recipe: Recipe, *, subfolder=None, revision=None, offline=False) -> dict:
    """What ``convert`` would do, without loading weights: family, layers, settings."""
    source = resolve_model(model, subfolder=subfolder, revision=revision, offline=offline)
    refuse_converted(source, model)
    family = detect_family(source.config, recipe.model.family)
    check_supported(family, recipe.sla2.token_tile)
    layers = resolve_targets(skeleton(source, family), family, recipe.sla2.targets, recipe.sla2.ignore)
    return {"model": model, "path": str(source.path), "family": family.name, "layers": layers,
            "num_layers": len(layers), "sla2": recipe.sla2.to_dict()}


@torch.no_grad()
def calibrate_alpha(model, family, model_config: dict, recipe: Recipe, data_dir=None,
                    device="cpu") -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Set each layer's alpha to the full-attention mass selected by its initial (identity) router.

    With ``mixing: query`` the alpha logit is instead, per head, the one that minimises the attention error of
    the per-query mix on the same pass (:func:`reference.fit_query_shift`; ``query-block`` likewise, its query
    weight starting at 0); with ``mixing: query-linear`` the query weight starts at 0, so alpha starts per
    head at the measured mass as with ``head``.
    Returns (sigmoid of each head's alpha logit, the measured selected mass per head)."""
    gen = torch.Generator().manual_seed(recipe.calibration.seed)
    batch = next(batches(family, model_config, recipe.data, 1, gen, data_dir))
    check_latent_shape(family, model_config, *batch["latents"].shape[2:], where=str(data_dir or "recipe data"))
    procs = sla2_processors(model)
    measured: dict[str, torch.Tensor] = {}
    shifts: dict[str, torch.Tensor] = {}

    def observe(proc, q, k, v):
        mask = proc.block_mask(q, k)
        qh, kh = q.transpose(1, 2), k.transpose(1, 2)
        measured[proc.layer_name] = reference.initial_alpha(qh, kh, mask, proc.block_q, proc.block_k)
        if proc.config.mixing in ("query", "query-block"):
            shifts[proc.layer_name] = reference.fit_query_shift(qh, kh, v.transpose(1, 2), mask, proc.block_q,
                                                                proc.block_k, proc.feature_q, proc.feature_k,
                                                                linear_keys=proc.config.linear_keys,
                                                                mixing=proc.config.mixing)
        return proc.dense_attention(q, k, v)  # downstream layers see the original activations

    with observing(procs.values(), observe):
        dtype = DTYPES[recipe.model.dtype]  # not a parameter's: some modules stay fp32
        denoiser_forward(model, family, batch, batch["latents"], torch.full((1,), 0.5), device, dtype)
    for name, proc in procs.items():
        alpha = measured[name].clamp(0.02, 0.98)
        proc.alpha_logit.copy_(shifts[name] if name in shifts else torch.log(alpha / (1 - alpha)))
    alphas = {name: [round(float(a), 4) for a in torch.sigmoid(p.alpha_logit)] for name, p in procs.items()}
    return alphas, {name: [round(float(m), 4) for m in measured[name]] for name in procs}


def selected_mass_summary(mass: dict[str, list[float]]) -> dict:
    """Mean over every head of the full-attention mass the initial router's blocks hold, and the layer with the
    lowest mean: how much of the attention the sparse branch keeps before any training (the rest is left to
    the linear branch and fine-tuning)."""
    per_layer = {name: sum(v) / len(v) for name, v in mass.items()}
    lowest = min(per_layer, key=per_layer.get)
    heads = [m for v in mass.values() for m in v]
    return {"mean": round(sum(heads) / len(heads), 4), "lowest_layer": lowest,
            "lowest_layer_mean": round(per_layer[lowest], 4), "per_head": mass}


def convert(model: str, out_dir: Path, recipe: Recipe, *, subfolder=None, revision=None, offline=False,
            overwrite=False, data_dir=None, device="cpu") -> dict:
    """Convert ``model`` (Hub id or local folder) into the work dir ``out_dir``; returns a summary."""
    out_dir = Path(out_dir)
    WorkDir.check_output(out_dir, overwrite)
    source = resolve_model(model, subfolder=subfolder, revision=revision, offline=offline)
    refuse_converted(source, model)
    family = detect_family(source.config, recipe.model.family)
    is_local = model == str(source.path) or Path(model).expanduser().exists()
    base = {"id": None if is_local else model, "name": source.path.name if subfolder is None else Path(model).name,
            "revision": source.revision, "subfolder": subfolder, "content_hash": content_hash(source.path),
            "sla_checkpoint": sla_checkpoint_info(source.path)}
    refuse_kernel_shapes(source, family, recipe, device)
    logger.info(f"loading {model} ({family.name} family, {recipe.model.dtype}) on {device}")
    net = load_model(source, family, dtype=recipe.model.dtype, device=device)
    s = recipe.sla2
    fixed_alpha = s.alpha_init != "calibrate"
    attention = s.attention_config()
    procs = sla2_(net, attention, targets=s.targets, ignore=s.ignore, family=family,
                  **({"alpha_init": s.alpha_init} if fixed_alpha else {}))
    budget = None
    if s.budget != "uniform":  # before alpha: the initial alpha is the mass of each layer's own top-k
        curves = measure_mass_curves(net, family, procs, source.config, recipe, data_dir, device)
        per_layer, budget = per_layer_budget(curves, s.topk, s.budget)
        attention = attention.replace(topk_per_layer=per_layer)
        for proc in procs.values():
            proc.config = attention
        logger.info("per-layer budget (key blocks): " + ", ".join(
            f"{name} {x['blocks']}" for name, x in budget["layers"].items()))
    mass = None
    if fixed_alpha:
        alphas = {n: [s.alpha_init] * p.heads for n, p in procs.items()}
        alpha_init = {"method": "fixed"}
    else:
        alphas, measured = calibrate_alpha(net, family, source.config, recipe, data_dir, device)
        mass = selected_mass_summary(measured)
        alpha_init = {"method": "calibrate", "selected_mass": mass}
        logger.info(f"initial alpha: the initial router's blocks hold {mass['mean']:.1%} of the attention mass "
                    f"(lowest layer {mass['lowest_layer']}: {mass['lowest_layer_mean']:.1%})")
    alpha_init["initial_alpha_logit"] = {name: [float(a) for a in p.alpha_logit.detach()] for name, p in procs.items()}
    layers = list(procs)
    logger.info(f"SLA2 installed on {len(layers)} layers (top-k {s.topk}, {s.budget} budget, quant {s.quant})")
    config = new_config(attention=attention, family=family, layers=layers, recipe_hash=recipe.hash(),
                        base=base, alpha_init=alpha_init, budget=budget)
    with atomic_dir(out_dir) as tmp:
        work = WorkDir(tmp)
        work.save_model(net, family)
        work.write_sla2_config(config)
        work.write_local({"base_path": str(source.path.resolve())})
        work.write_recipe(recipe)
    logger.info(f"wrote {out_dir}")
    return {"work_dir": str(out_dir), "family": family.name, "layers": layers, "alpha": alphas,
            "selected_mass": mass, "base_model": base, "topk_per_layer": dict(attention.topk_per_layer),
            "budget": budget}


def install_convert_only(model, family, config, attention, recipe: Recipe, model_config: dict, data_dir=None,
                         device="cpu") -> str:
    """Put SLA2 on ``model`` (the original) as ``convert`` left it: the layers of ``config`` (a work dir's
    ``sla2_config.json`` record) running with ``attention``, identity routers and the initial alpha.

    Returns where alpha came from: the exact logits recorded at convert time; for a work dir converted before
    they were recorded, the recipe's fixed value, or one more measurement as convert makes it (on ``data_dir``
    or synthetic inputs, so close to the original but not necessarily equal)."""
    procs = install_sla2(model, family, list(config.layers), attention)
    alpha_init = config.alpha_init or {}
    recorded = alpha_init.get("initial_alpha_logit")
    if recorded is not None:
        with torch.no_grad():
            for name, proc in procs.items():
                logits = torch.tensor(recorded.get(name, []), dtype=torch.float32)
                if logits.shape != proc.alpha_logit.shape:
                    raise InputError(f"sla2_config.json: alpha_init.initial_alpha_logit of {name} has shape "
                                     f"{tuple(logits.shape)}, expected {tuple(proc.alpha_logit.shape)}")
                proc.alpha_logit.copy_(logits)
        return "recorded at convert"
    fixed = recipe.sla2.alpha_init
    if alpha_init.get("method") == "fixed" and not isinstance(fixed, str):
        with torch.no_grad():
            for proc in procs.values():
                proc.alpha_logit.fill_(math.log(fixed / (1 - fixed)))
        return "the recipe's fixed value"
    calibrate_alpha(model, family, model_config, recipe, data_dir, device)
    return "re-measured (not recorded at convert)"
