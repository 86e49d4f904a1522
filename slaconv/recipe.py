"""Recipes: the YAML that says which layers to convert and how to calibrate and validate them.

A recipe is a nested mapping whose keys and defaults are those of :data:`DEFAULTS`.  Loading
merges a user file over the defaults (unknown keys are an error, not ignored), then command-line
overrides (dotted keys such as ``sla2.topk``) over that, then checks every range.  The resolved
recipe is saved next to each stage's outputs so a run can be repeated exactly.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError, RecipeError

QUANT_MODES = ("none", "int8", "int8-fp8")
BLOCK_SIZES = (64, 128)
OBJECTIVES = ("diffusion", "distill")

DEFAULTS: dict[str, Any] = {
    "name": "default",
    "model": {
        "family": "auto",  # or a registered family name ("wan")
        "dtype": "float32",  # dtype the model is run in during calibration/validation
    },
    "sla2": {
        # Exact module names, or "re:<regex>" matched with re.fullmatch; empty = the family's default
        # self-attention layers.
        "targets": [],
        "ignore": [],
        "topk": 0.05,
        "topk_per_layer": {},
        "block_q": 128,
        "block_k": 64,
        "quant": "int8-fp8",
        # "calibrate": alpha from the selected full-attention mass on a calibration pass; or a number.
        "alpha_init": "calibrate",
    },
    "data": {
        # Latent shape (C is the model's in_channels) used for data-free calibration and validation.
        "frames": 2,
        "height": 16,
        "width": 16,
        "text_len": 12,
    },
    "calibration": {
        "seed": 0,
        "checkpoint_every": 50,
        "checkpoints_total_limit": 2,
        # Fixed held-out samples (own seed) scored before and after each stage.
        "eval_samples": 2,
        "stage1": {
            "steps": 100,
            # Router projections and alpha logits need very different step sizes: on the quality
            # DiT (benchmarks/quality) one lr of 5e-3 left alpha nearly unmoved while the router
            # drifted, and the held-out hard-mask error rose; router 1e-4 with alpha 5e-2 lowered it
            # 0.348 -> 0.285 in 20 steps (alpha alone: 0.288).
            "lr": 1e-4,
            "alpha_lr": 5e-2,
            "tau": 0.1,
            "batch_size": 1,
            "query_blocks_per_step": 8,
        },
        "stage2": {
            "steps": 50,
            "lr": 1e-5,
            "weight_decay": 0.01,
            "warmup_steps": 5,
            "grad_clip": 1.0,
            "batch_size": 1,
            "grad_accum": 1,
            "objective": "distill",
            "quant": None,  # None: sla2.quant
            "gradient_checkpointing": False,
            "timestep_shift": 5.0,
            # false keeps every alpha at its stage-1 (or convert) value: for ablations such as sparse-only
            # (alpha pinned to 1) or for separating what the mixing ratio and the weights each contribute.
            "train_alpha": True,
            # distill only. "online": the dense teacher runs beside the student at every step.
            # "precompute": its targets for every step (and the held-out samples) are computed first and
            # kept on the host (one latent per micro-batch), then the teacher is freed: the same numbers,
            # without the teacher's weights on the device during training (what FSDP runs of 14B need).
            "teacher": "online",
        },
    },
    "validation": {
        "seed": 1234,
        "num_samples": 2,
        "timesteps": [900, 600, 300, 50],
        "sample_steps": 4,
        "timestep_shift": 5.0,
        "gates": {
            "attention_rel_l2_max": 1.0,
            "velocity_rel_l2_max": 1.0,
            "sample_psnr_min_db": 0.0,
        },
    },
}


def _merge(base: dict, update: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        where = f"{path}{key}"
        if key not in base:
            raise RecipeError(f"unknown recipe key '{where}'")
        free_form = key in ("topk_per_layer",) or base[key] is None
        if isinstance(base[key], dict) and not free_form:
            if not isinstance(value, dict):
                raise RecipeError(f"recipe key '{where}' must be a mapping")
            out[key] = _merge(base[key], value, where + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise RecipeError(message)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate(recipe: dict) -> dict:
    """Check types and ranges; raise :class:`RecipeError` with the offending key."""
    s = recipe["sla2"]
    _check(_is_number(s["topk"]) and 0 < s["topk"] <= 1, f"sla2.topk must be in (0, 1], got {s['topk']!r}")
    for name, value in (s["topk_per_layer"] or {}).items():
        _check(_is_number(value) and 0 < value <= 1, f"sla2.topk_per_layer['{name}'] must be in (0, 1], got {value!r}")
    for key in ("block_q", "block_k"):
        _check(s[key] in BLOCK_SIZES, f"sla2.{key} must be one of {BLOCK_SIZES}, got {s[key]!r}")
    _check(s["quant"] in QUANT_MODES, f"sla2.quant must be one of {QUANT_MODES}, got {s['quant']!r}")
    for key in ("targets", "ignore"):
        _check(isinstance(s[key], list) and all(isinstance(t, str) for t in s[key]), f"sla2.{key} must be a list of strings")
    a = s["alpha_init"]
    _check(a == "calibrate" or (_is_number(a) and 0 < a < 1), f"sla2.alpha_init must be 'calibrate' or in (0, 1), got {a!r}")
    _check(recipe["model"]["dtype"] in ("float32", "bfloat16", "float16"), "model.dtype must be float32, bfloat16 or float16")
    for key in ("frames", "height", "width", "text_len"):
        v = recipe["data"][key]
        _check(isinstance(v, int) and v > 0, f"data.{key} must be a positive integer, got {v!r}")
    c = recipe["calibration"]
    for stage in ("stage1", "stage2"):
        st = c[stage]
        _check(isinstance(st["steps"], int) and st["steps"] >= 0, f"calibration.{stage}.steps must be an integer >= 0")
        if stage == "stage1":  # lr 0 freezes the router: an alpha-only stage 1
            _check(_is_number(st["lr"]) and st["lr"] >= 0, "calibration.stage1.lr must be >= 0")
        else:
            _check(_is_number(st["lr"]) and st["lr"] > 0, f"calibration.{stage}.lr must be > 0")
        _check(isinstance(st["batch_size"], int) and st["batch_size"] >= 1, f"calibration.{stage}.batch_size must be >= 1")
    _check(_is_number(c["stage1"]["tau"]) and c["stage1"]["tau"] > 0, "calibration.stage1.tau must be > 0")
    _check(_is_number(c["stage1"]["alpha_lr"]) and c["stage1"]["alpha_lr"] >= 0, "calibration.stage1.alpha_lr must be >= 0")
    _check(c["stage1"]["steps"] == 0 or c["stage1"]["lr"] > 0 or c["stage1"]["alpha_lr"] > 0,
           "calibration.stage1: lr and alpha_lr are both 0, so there is nothing to train (set steps: 0 to skip stage 1)")
    _check(isinstance(c["stage1"]["query_blocks_per_step"], int) and c["stage1"]["query_blocks_per_step"] >= 1,
           "calibration.stage1.query_blocks_per_step must be >= 1")
    st2 = c["stage2"]
    for key in ("weight_decay", "grad_clip"):
        _check(_is_number(st2[key]) and st2[key] >= 0, f"calibration.stage2.{key} must be a number >= 0")
    _check(isinstance(st2["warmup_steps"], int) and st2["warmup_steps"] >= 0,
           "calibration.stage2.warmup_steps must be an integer >= 0")
    _check(isinstance(st2["gradient_checkpointing"], bool), "calibration.stage2.gradient_checkpointing must be true/false")
    _check(isinstance(st2["train_alpha"], bool), "calibration.stage2.train_alpha must be true/false")
    _check(st2["teacher"] in ("online", "precompute"), "calibration.stage2.teacher must be 'online' or 'precompute'")
    _check(isinstance(c["seed"], int), "calibration.seed must be an integer")
    _check(isinstance(c["eval_samples"], int) and c["eval_samples"] >= 0, "calibration.eval_samples must be >= 0")
    _check(isinstance(c["checkpoints_total_limit"], int) and c["checkpoints_total_limit"] >= 1,
           "calibration.checkpoints_total_limit must be >= 1")
    _check(st2["objective"] in OBJECTIVES, f"calibration.stage2.objective must be one of {OBJECTIVES}")
    _check(st2["quant"] is None or st2["quant"] in QUANT_MODES, f"calibration.stage2.quant must be one of {QUANT_MODES}")
    _check(isinstance(st2["grad_accum"], int) and st2["grad_accum"] >= 1, "calibration.stage2.grad_accum must be >= 1")
    _check(isinstance(c["checkpoint_every"], int) and c["checkpoint_every"] >= 1, "calibration.checkpoint_every must be >= 1")
    v = recipe["validation"]
    _check(isinstance(v["num_samples"], int) and v["num_samples"] >= 1, "validation.num_samples must be >= 1")
    _check(isinstance(v["sample_steps"], int) and v["sample_steps"] >= 1, "validation.sample_steps must be >= 1")
    _check(isinstance(v["timesteps"], list) and len(v["timesteps"]) > 0
           and all(_is_number(t) and 0 <= t < 1000 for t in v["timesteps"]),
           "validation.timesteps must be a non-empty list of numbers in [0, 1000)")
    _check(isinstance(v["seed"], int), "validation.seed must be an integer")
    for where, shift in (("calibration.stage2", st2["timestep_shift"]), ("validation", v["timestep_shift"])):
        _check(_is_number(shift) and shift > 0, f"{where}.timestep_shift must be > 0")
    for key, value in v["gates"].items():
        _check(_is_number(value), f"validation.gates.{key} must be a number, got {value!r}")
    return recipe


def _parse_override(key: str, raw: Any) -> dict:
    value = yaml.safe_load(raw) if isinstance(raw, str) else raw
    nested: dict = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load_recipe(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """Defaults <- recipe file <- dotted ``overrides`` (values already typed, or YAML strings)."""
    recipe = copy.deepcopy(DEFAULTS)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"recipe file not found: {p}")
        try:
            user = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(user, dict):
            raise RecipeError(f"recipe {p} must be a mapping at the top level")
        recipe = _merge(recipe, user)
    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        recipe = _merge(recipe, _parse_override(key, raw))
    return validate(recipe)


def recipe_hash(recipe: dict) -> str:
    """Stable short hash of the resolved recipe (sha256 of its canonical JSON)."""
    blob = json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dump_recipe(recipe: dict) -> str:
    return yaml.safe_dump(recipe, sort_keys=False)


def save_recipe(recipe: dict, path: str | Path) -> None:
    Path(path).write_text(dump_recipe(recipe))
