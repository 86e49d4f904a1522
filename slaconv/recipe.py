"""Recipes: the YAML that says which layers to convert and how to calibrate and validate them.

A :class:`Recipe` is a tree of frozen dataclasses, one per YAML section, whose fields and defaults
are the recipe's keys and defaults.  Loading applies a user file over the defaults (unknown keys
are an error, not ignored), then command-line overrides (dotted keys such as ``sla2.topk``) over
that; every section checks its ranges when it is built, and the ``sla2`` section builds an
:class:`~slaconv.config.SLA2Config`, whose checks are the attention settings' only ones.  The
resolved recipe is saved next to each stage's outputs so a run can be repeated exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import BUDGETS, QUANT_MODES, ConfigError, SLA2Config
from .errors import InputError, RecipeError
from .utils.files import write_text_atomic
from .utils.messages import first_line

OBJECTIVES = ("diffusion", "distill")
TEACHER_MODES = ("online", "precompute")
LR_SCHEDULES = ("constant", "cosine")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise RecipeError(message)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x: Any, minimum: int | None = None) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and (minimum is None or x >= minimum)


WRITTEN_WHEN_SET = "written_when_set"
"""Field metadata of a key added after recipes were first saved: left out of :meth:`_Section.to_dict` at its
default, so the recipe files and hashes of earlier work dirs stay as they were."""


class _Section:
    """Behaviour shared by every recipe section (all frozen dataclasses)."""

    def to_dict(self, every_key: bool = False) -> dict[str, Any]:
        """Plain nested mapping, keys in recipe order (what ``recipe.yaml`` holds); ``every_key`` also lists
        the keys left out at their defaults (:data:`WRITTEN_WHEN_SET`): the whole schema."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not every_key and f.metadata.get(WRITTEN_WHEN_SET) and value == f.default:
                continue
            out[f.name] = value.to_dict(every_key) if isinstance(value, _Section) else _plain(value)
        return out

    def _updated(self, changes: Mapping[str, Any], where: str) -> _Section:
        """A copy with ``changes`` (a nested, possibly partial mapping) applied and checked."""
        fields = {f.name for f in dataclasses.fields(self)}
        new = {}
        for key, value in changes.items():
            path = f"{where}{key}"
            _check(key in fields, f"unknown recipe key '{path}'")
            current = getattr(self, key)
            if isinstance(current, _Section):
                _check(isinstance(value, Mapping), f"recipe key '{path}' must be a mapping")
                new[key] = current._updated(value, path + ".")
            else:
                new[key] = copy.deepcopy(value)
        return dataclasses.replace(self, **new)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class ModelSettings(_Section):
    family: str = "auto"
    """``auto`` (from the model's ``_class_name``) or a registered family name (``wan``)."""
    dtype: str = "float32"
    """dtype the model runs in during convert, calibration and validation."""

    def __post_init__(self) -> None:
        _check(isinstance(self.family, str), f"model.family must be a family name or 'auto', got {self.family!r}")
        from .utils.devices import DTYPES  # here, so that reading a recipe does not import torch

        _check(self.dtype in DTYPES, "model.dtype must be float32, bfloat16 or float16")


@dataclass(frozen=True)
class SLA2Settings(_Section):
    targets: tuple[str, ...] = ()
    """Exact module names, or ``re:<regex>`` matched with re.fullmatch; empty = the family's default
    self-attention layers."""
    ignore: tuple[str, ...] = ()
    topk: float = SLA2Config.topk
    topk_per_layer: Mapping[str, float] | None = field(default_factory=dict)
    """Top-k of named layers, overriding ``topk``."""
    block_q: int = SLA2Config.block_q
    block_k: int = SLA2Config.block_k
    quant: str = SLA2Config.quant
    feature_map: str = field(default=SLA2Config.feature_map, metadata={WRITTEN_WHEN_SET: True})
    """The linear branch's phi: ``softmax`` (over the head dim) or ``hedgehog`` (learned, per head)."""
    mixing: str = field(default=SLA2Config.mixing, metadata={WRITTEN_WHEN_SET: True})
    """How alpha mixes the branches: ``head`` (one per head) or ``query`` (per query row from the estimated tail
    mass, the per-head alpha logit a log-scale correction of it)."""
    linear_keys: str = field(default=SLA2Config.linear_keys, metadata={WRITTEN_WHEN_SET: True})
    """The keys the linear branch covers: ``unselected`` (those its query block did not select) or ``all``
    (every key: one state per head, no per-block state to build)."""
    token_tile: tuple[int, int, int] | None = field(default=None, metadata={WRITTEN_WHEN_SET: True})
    """Regroup the video tokens into tiles of ``[frames, rows, columns]`` (or ``"4x4x4"``) so that each attention
    block is a compact piece of the video (``[4, 4, 4]``: 64 tokens, one key block); unset keeps the model's raster
    order."""
    alpha_init: str | float = "calibrate"
    """``calibrate``: alpha from the selected full-attention mass on a calibration pass; or a number."""
    budget: str = field(default="uniform", metadata={WRITTEN_WHEN_SET: True})
    """``uniform``: every layer keeps ``topk``.  ``per_layer``: ``convert`` spends the same number of key blocks
    unevenly, each block where it holds the most attention mass; ``per_layer_tail``: in proportion to the mass
    the uniform count leaves out, more to diffuse layers (:mod:`slaconv.budget`).  Either is stored as the work
    dir's per-layer top-k."""

    def __post_init__(self) -> None:
        for key in ("targets", "ignore"):
            value = getattr(self, key)
            _check(isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value),
                   f"sla2.{key} must be a list of strings")
            object.__setattr__(self, key, tuple(value))
        _check(self.topk_per_layer is None or isinstance(self.topk_per_layer, Mapping),
               "sla2.topk_per_layer must be a mapping of layer name to top-k")
        if isinstance(self.token_tile, str):  # "4x4x4", as on the command line
            from .token_order import parse_tile  # here: it imports torch, which reading a recipe otherwise does not

            object.__setattr__(self, "token_tile", parse_tile(self.token_tile))
        if isinstance(self.token_tile, list):
            object.__setattr__(self, "token_tile", tuple(self.token_tile))
        self.attention_config()
        _check(self.budget in BUDGETS, f"sla2.budget must be one of {BUDGETS}, got {self.budget!r}")
        _check(self.budget == "uniform" or not self.topk_per_layer,
               f"sla2.budget: {self.budget} allocates every layer's top-k itself; leave sla2.topk_per_layer empty")
        a = self.alpha_init
        _check(a == "calibrate" or (_is_number(a) and 0 < a < 1),
               f"sla2.alpha_init must be 'calibrate' or in (0, 1), got {a!r}")

    def attention_config(self) -> SLA2Config:
        """The attention settings these give every converted layer."""
        try:
            return SLA2Config(topk=self.topk, block_q=self.block_q, block_k=self.block_k, quant=self.quant,
                              feature_map=self.feature_map, mixing=self.mixing, linear_keys=self.linear_keys,
                              topk_per_layer=self.topk_per_layer or {}, token_tile=self.token_tile)
        except ConfigError as exc:
            raise RecipeError(f"sla2.{exc}") from None


@dataclass(frozen=True)
class DataSettings(_Section):
    """The synthetic samples of data-free calibration and validation: latent frames x height x width (the
    channels are the model's ``in_channels``) and ``text_len`` prompt-embedding tokens."""

    frames: int = 2
    height: int = 16
    width: int = 16
    text_len: int = 12

    def __post_init__(self) -> None:
        for key in ("frames", "height", "width", "text_len"):
            v = getattr(self, key)
            _check(_is_int(v, 1), f"data.{key} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class Stage1Settings(_Section):
    """Stage 1: router and alpha, layer by layer, against full attention."""

    steps: int = 100
    lr: float = 1e-4
    """The router projections' learning rate; 0 freezes the router (an alpha-only stage 1).  Router and
    alpha logits need very different step sizes: on the quality DiT (benchmarks/quality) one lr of 5e-3
    left alpha nearly unmoved while the router drifted, and the held-out hard-mask error rose; router 1e-4
    with alpha 5e-2 lowered it 0.348 -> 0.285 in 20 steps (alpha alone: 0.288)."""
    alpha_lr: float = 5e-2
    feature_lr: float = field(default=3e-2, metadata={WRITTEN_WHEN_SET: True})
    """The hedgehog feature weights' learning rate (used only with ``sla2.feature_map: hedgehog``)."""
    tau: float = 0.1
    batch_size: int = 1
    query_blocks_per_step: int = 8

    def __post_init__(self) -> None:
        _check(_is_int(self.steps, 0), "calibration.stage1.steps must be an integer >= 0")
        _check(_is_number(self.lr) and self.lr >= 0, "calibration.stage1.lr must be >= 0")
        _check(_is_int(self.batch_size, 1), "calibration.stage1.batch_size must be >= 1")
        _check(_is_number(self.tau) and self.tau > 0, "calibration.stage1.tau must be > 0")
        _check(_is_number(self.alpha_lr) and self.alpha_lr >= 0, "calibration.stage1.alpha_lr must be >= 0")
        _check(_is_number(self.feature_lr) and self.feature_lr >= 0, "calibration.stage1.feature_lr must be >= 0")
        _check(_is_int(self.query_blocks_per_step, 1), "calibration.stage1.query_blocks_per_step must be >= 1")


@dataclass(frozen=True)
class Stage2Settings(_Section):
    """Stage 2: every weight and alpha end to end, router frozen, the sparse branch low-bit."""

    steps: int = 50
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_steps: int = 5
    lr_schedule: str = field(default="constant", metadata={WRITTEN_WHEN_SET: True})
    """After the warm-up: ``constant`` keeps ``lr``; ``cosine`` decays it along a half cosine to nearly 0 at
    the last step, so the run ends settled in a minimum rather than at the step noise of a full rate."""
    grad_clip: float = 1.0
    batch_size: int = 1
    grad_accum: int = 1
    objective: str = "distill"
    quant: str | None = None
    """None: ``sla2.quant``."""
    gradient_checkpointing: bool = False
    timestep_shift: float = 5.0
    train_alpha: bool = True
    """false keeps every alpha at its stage-1 (or convert) value: for ablations such as sparse-only (alpha
    pinned to 1) or for separating what the mixing ratio and the weights each contribute."""
    teacher: str = "online"
    """distill only. ``online``: the dense teacher runs beside the student at every step.  ``precompute``:
    its targets for every step (and the held-out samples) are computed first and kept on the host (one
    latent per micro-batch), then the teacher is freed: the same numbers, without the teacher's weights
    on the device during training (what FSDP runs of 14B need)."""

    def __post_init__(self) -> None:
        _check(_is_int(self.steps, 0), "calibration.stage2.steps must be an integer >= 0")
        _check(_is_number(self.lr) and self.lr > 0, "calibration.stage2.lr must be > 0")
        _check(_is_int(self.batch_size, 1), "calibration.stage2.batch_size must be >= 1")
        for key in ("weight_decay", "grad_clip"):
            value = getattr(self, key)
            _check(_is_number(value) and value >= 0, f"calibration.stage2.{key} must be a number >= 0")
        _check(_is_int(self.warmup_steps, 0), "calibration.stage2.warmup_steps must be an integer >= 0")
        _check(self.lr_schedule in LR_SCHEDULES, f"calibration.stage2.lr_schedule must be one of {LR_SCHEDULES}")
        _check(isinstance(self.gradient_checkpointing, bool),
               "calibration.stage2.gradient_checkpointing must be true/false")
        _check(isinstance(self.train_alpha, bool), "calibration.stage2.train_alpha must be true/false")
        _check(self.teacher in TEACHER_MODES, "calibration.stage2.teacher must be 'online' or 'precompute'")
        _check(self.objective in OBJECTIVES, f"calibration.stage2.objective must be one of {OBJECTIVES}")
        _check(self.quant is None or self.quant in QUANT_MODES,
               f"calibration.stage2.quant must be one of {QUANT_MODES}")
        _check(_is_int(self.grad_accum, 1), "calibration.stage2.grad_accum must be >= 1")
        _check(_is_number(self.timestep_shift) and self.timestep_shift > 0,
               "calibration.stage2.timestep_shift must be > 0")


@dataclass(frozen=True)
class CalibrationSettings(_Section):
    """Settings both stages share (seed, checkpoints, held-out scoring) and each stage's own."""

    seed: int = 0
    """Seed of the training samples and noise; held-out scoring uses seed + 7777."""

    checkpoint_every: int = 50
    """Steps between checkpoints."""
    checkpoints_total_limit: int = 2
    """Checkpoints kept per stage; older ones are deleted."""
    eval_samples: int = 2
    """Fixed held-out samples (own seed) scored at the start of each stage, at every checkpoint and at the end:
    a stage keeps its best scored state; 0 turns scoring off (a stage then keeps its last state)."""
    divergence_factor: float = field(default=2.0, metadata={WRITTEN_WHEN_SET: True})
    """A stage stops as diverged when a held-out score exceeds this multiple of the best so far."""
    heldout_tolerance: float = field(default=0.02, metadata={WRITTEN_WHEN_SET: True})
    """A stage whose best state scores more than this fraction worse than its start fails (exit 6) and leaves
    the work dir's weights as they were; within it (the held-out samples are few) the best state is kept."""
    stage1: Stage1Settings = field(default_factory=Stage1Settings)
    stage2: Stage2Settings = field(default_factory=Stage2Settings)

    def __post_init__(self) -> None:
        _check(_is_int(self.seed), "calibration.seed must be an integer")
        _check(_is_int(self.eval_samples, 0), "calibration.eval_samples must be >= 0")
        _check(_is_int(self.checkpoints_total_limit, 1), "calibration.checkpoints_total_limit must be >= 1")
        _check(_is_int(self.checkpoint_every, 1), "calibration.checkpoint_every must be >= 1")
        _check(_is_number(self.divergence_factor) and self.divergence_factor > 1,
               "calibration.divergence_factor must be a number > 1")
        _check(_is_number(self.heldout_tolerance) and self.heldout_tolerance >= 0,
               "calibration.heldout_tolerance must be a number >= 0")


@dataclass(frozen=True)
class Gates(_Section):
    """Quality gates: ``slaconv validate`` fails (exit 4) when a mean crosses its threshold.

    The defaults were measured (``python -m slaconv.quality.gate_table``; docs/design.md, section 5) on the
    quality benchmark's trained DiT at 75% sparsity and on the demo's random-weight tiny Wan: calibrated
    models read attention rel. L2 0.13-0.18 (0.17-0.29 at 90-97% on the DiT's full-size videos), velocity rel.
    L2 0.01-0.15, sample PSNR 15.5 dB and up, and at most 0.70x their convert-only velocity error; broken ones
    (router randomised, alpha forced to 0, stage 2 at lr 1.0) cross at least one gate, except a randomised
    router on random weights, where there is no structure for a router to find.
    """

    attention_rel_l2_max: float = 0.35
    """SLA2 against full attention on the model's own Q/K/V (broken DiT: 0.63 and up)."""
    velocity_rel_l2_max: float = 0.3
    """Transformer output against the original's (broken DiT: 0.58 and up)."""
    sample_psnr_min_db: float = 12.0
    """Short Euler samples against the original's from the same noise (lr 1.0 ruin: -35 and -0.2 dB)."""
    velocity_vs_convert_only_max: float = 1.1
    """Velocity error over the convert-only baseline's (the original with SLA2 before calibration): above 1,
    calibration made the model worse than not calibrating at all (alpha forced to 0: 1.5x to 3.6x).  The 10%
    margin is for calibrations that changed little, whose ratio is 1 plus measurement noise (a 3-step
    calibration of the test suite's tiny Wan: 1.04x)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check(_is_number(value), f"validation.gates.{f.name} must be a number, got {value!r}")


@dataclass(frozen=True)
class ValidationSettings(_Section):
    seed: int = 1234
    num_samples: int = 2
    timesteps: tuple[float, ...] = (900, 600, 300, 50)
    sample_steps: int = 4
    timestep_shift: float = 5.0
    gates: Gates = field(default_factory=Gates)

    def __post_init__(self) -> None:
        _check(_is_int(self.num_samples, 1), "validation.num_samples must be >= 1")
        _check(_is_int(self.sample_steps, 1), "validation.sample_steps must be >= 1")
        t = self.timesteps
        _check(isinstance(t, (list, tuple)) and len(t) > 0 and all(_is_number(x) and 0 <= x < 1000 for x in t),
               "validation.timesteps must be a non-empty list of numbers in [0, 1000)")
        object.__setattr__(self, "timesteps", tuple(t))
        _check(_is_int(self.seed), "validation.seed must be an integer")
        _check(_is_number(self.timestep_shift) and self.timestep_shift > 0, "validation.timestep_shift must be > 0")


@dataclass(frozen=True)
class Recipe(_Section):
    """A whole recipe: every section checked; immutable (:meth:`override` returns a changed copy)."""

    name: str = "default"
    model: ModelSettings = field(default_factory=ModelSettings)
    sla2: SLA2Settings = field(default_factory=SLA2Settings)
    data: DataSettings = field(default_factory=DataSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)

    def __post_init__(self) -> None:
        s1 = self.calibration.stage1
        trains_features = self.sla2.feature_map == "hedgehog" and s1.feature_lr > 0
        _check(s1.steps == 0 or s1.lr > 0 or s1.alpha_lr > 0 or trains_features,
               "calibration.stage1: lr and alpha_lr are both 0 (and no feature map is learned), so there is "
               "nothing to train (set steps: 0 to skip stage 1)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """The defaults with ``data`` (a nested, possibly partial mapping) applied; :class:`RecipeError`
        names the first unknown key or out-of-range value."""
        return cls()._updated(data, "")

    def override(self, overrides: Mapping[str, Any]) -> Recipe:
        """A copy with dotted-key ``overrides`` applied in order (``{"sla2.topk": 0.03}``): values already
        typed, or strings parsed as YAML (``"0.03"``, ``"[900, 50]"``); ``None`` values are skipped."""
        recipe = self
        for key, raw in overrides.items():
            if raw is None:
                continue
            value = yaml.safe_load(raw) if isinstance(raw, str) else raw
            nested: dict = {}
            node = nested
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
            recipe = recipe._updated(nested, "")
        return recipe

    def hash(self) -> str:
        """Stable short hash of the resolved recipe (sha256 of its canonical JSON)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def dump(self) -> str:
        """The resolved recipe as YAML (keys in recipe order); :func:`load_recipe` reads it back."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write :meth:`dump` to ``path`` (atomically)."""
        write_text_atomic(path, self.dump())


def load_recipe(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Defaults <- recipe file <- dotted ``overrides`` (values already typed, or YAML strings)."""
    recipe = Recipe()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"recipe file not found: {p}")
        try:
            user = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe {p} is not valid YAML: {first_line(exc)}") from None
        if not isinstance(user, dict):
            raise RecipeError(f"recipe {p} must be a mapping at the top level")
        recipe = Recipe.from_dict(user)
    return recipe.override(overrides or {})
