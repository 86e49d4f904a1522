"""``slaconv convert``: load a diffusers transformer, install SLA2 on the target layers, save.

The router starts as the identity (SLA's pooled top-k router); alpha starts, per head, at the
full-attention probability mass the initial mask selects, measured on one calibration pass
(``sla2.alpha_init: calibrate``), or at a fixed value from the recipe.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .families import detect_family
from .inputs import batches, check_latent_shape
from .install import install_sla2, resolve_targets, sla2_processors
from .kernels import reference
from .recipe import recipe_hash, save_recipe
from .source import DTYPES, content_hash, load_model, resolve_model, sla_checkpoint_info
from .workdir import (
    LOCAL_NAME,
    RECIPE_NAME,
    atomic_dir,
    check_output_dir,
    new_sla2_config,
    save_model_files,
    write_json,
)


def plan(model: str, recipe: dict, *, subfolder=None, revision=None, offline=False) -> dict:
    """What ``convert`` would do, without loading weights: family, layers, settings."""
    from accelerate import init_empty_weights

    source = resolve_model(model, subfolder=subfolder, revision=revision, offline=offline)
    family = detect_family(source.config, recipe["model"]["family"])
    with init_empty_weights():
        skeleton = family.load_class().from_config(source.config)
    layers = resolve_targets(skeleton, family, recipe["sla2"]["targets"], recipe["sla2"]["ignore"])
    return {"model": model, "path": str(source.path), "family": family.name, "layers": layers,
            "num_layers": len(layers), "sla2": recipe["sla2"]}


@torch.no_grad()
def calibrate_alpha(model, family, model_config: dict, recipe: dict, data_dir=None,
                    device="cpu") -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Set each layer's alpha to the full-attention mass selected by its initial (identity) router.

    Returns (alpha per head after clamping to [0.02, 0.98], the measured selected mass per head)."""
    gen = torch.Generator().manual_seed(recipe["calibration"]["seed"])
    batch = next(batches(family, model_config, recipe["data"], 1, gen, data_dir))
    check_latent_shape(family, model_config, *batch["latents"].shape[2:], where=str(data_dir or "recipe data"))
    procs = sla2_processors(model)
    measured: dict[str, torch.Tensor] = {}

    def observe(proc, q, k, v):
        qh, kh = q.transpose(1, 2), k.transpose(1, 2)
        nk = reference.block_count(kh.shape[2], proc.block_k)
        scores = reference.router_scores(qh, kh, proc.router_q, proc.router_k, proc.block_q, proc.block_k)
        mask = reference.hard_topk_mask(scores, reference.topk_count(proc.topk, nk))
        measured[proc.layer_name] = reference.initial_alpha(qh, kh, mask, proc.block_q, proc.block_k)
        return proc.dense_attention(q, k, v)  # downstream layers see the original activations

    for proc in procs.values():
        proc.observer = observe
    try:
        dtype = DTYPES[recipe["model"]["dtype"]]  # not a parameter's: some modules stay fp32
        kwargs = family.make_inputs(model, batch["latents"].to(device, dtype),
                                    torch.full((1,), 500.0, device=device),
                                    batch["prompt_embeds"].to(device, dtype))
        model(**kwargs)
    finally:
        for proc in procs.values():
            proc.observer = None
    for name, proc in procs.items():
        alpha = measured[name].clamp(0.02, 0.98)
        proc.alpha_logit.copy_(torch.log(alpha / (1 - alpha)))
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


def convert(model: str, out_dir: Path, recipe: dict, *, subfolder=None, revision=None, offline=False,
            overwrite=False, data_dir=None, device="cpu") -> dict:
    """Convert ``model`` (Hub id or local folder) into the work dir ``out_dir``; returns a summary."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    source = resolve_model(model, subfolder=subfolder, revision=revision, offline=offline)
    family = detect_family(source.config, recipe["model"]["family"])
    is_local = model == str(source.path) or Path(model).expanduser().exists()
    base = {"id": None if is_local else model, "name": source.path.name if subfolder is None else Path(model).name,
            "revision": source.revision, "subfolder": subfolder, "content_hash": content_hash(source.path),
            "sla_checkpoint": sla_checkpoint_info(source.path)}
    net = load_model(source, family, dtype=recipe["model"]["dtype"], device=device)
    s = recipe["sla2"]
    layers = resolve_targets(net, family, s["targets"], s["ignore"])
    install_sla2(net, family, layers, topk=s["topk"], block_q=s["block_q"], block_k=s["block_k"],
                 quant=s["quant"], topk_per_layer=s["topk_per_layer"])
    mass = None
    if s["alpha_init"] == "calibrate":
        alphas, measured = calibrate_alpha(net, family, source.config, recipe, data_dir, device)
        mass = selected_mass_summary(measured)
    else:
        logit = math.log(s["alpha_init"] / (1 - s["alpha_init"]))
        for proc in sla2_processors(net).values():
            proc.alpha_logit.data.fill_(logit)
        alphas = {n: [s["alpha_init"]] * p.heads for n, p in sla2_processors(net).items()}
    config = new_sla2_config(family=family, layers=layers, recipe=recipe, recipe_hash=recipe_hash(recipe), base=base)
    config["alpha_init"] = {"method": s["alpha_init"] if s["alpha_init"] == "calibrate" else "fixed"}
    if mass is not None:
        config["alpha_init"]["selected_mass"] = mass
    with atomic_dir(out_dir) as tmp:
        save_model_files(net, family, tmp)
        write_json(tmp / "sla2_config.json", config)
        write_json(tmp / LOCAL_NAME, {"base_path": str(source.path.resolve())})
        save_recipe(recipe, tmp / RECIPE_NAME)
    return {"work_dir": str(out_dir), "family": family.name, "layers": layers, "alpha": alphas,
            "selected_mass": mass, "base_model": base}
