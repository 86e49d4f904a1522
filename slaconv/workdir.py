"""The work directory: a plain diffusers model folder plus SLA2 state.

Layout::

    config.json, diffusion_pytorch_model*.safetensors   plain diffusers weights (dense-loadable)
    sla2.safetensors                                    "<layer>.router_q|router_k|alpha_logit", fp32
                                                        (+ "feature_q|feature_k" with the hedgehog feature map)
    sla2_config.json                                    format, settings, layers, provenance, summaries
    recipe.yaml                                         the resolved recipe
    local.json                                          machine-local facts (never pushed)
    reports/, checkpoints/, logs/                       written by validate / calibrate

The SLA2 tensors live in a sidecar file rather than inside the diffusers shards, so plain
``from_pretrained`` loads the folder without even an "unexpected keys" warning, and the SLA2 state
can be checked (missing / extra / mis-shaped) on its own.  :class:`WorkDir` owns these names and
every read and write of them; a package downloaded from the Hub has the same layout.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .checksums import sha256_file
from .config import FORMAT_NAME, FORMAT_VERSION, SLA2Config
from .digest import weights_digest
from .errors import InputError, OutputExistsError
from .families import Family, detect_family
from .install import install_sla2, sla2_processors, stock_processors
from .recipe import Recipe, load_recipe
from .source import ModelSource, content_hash, load_model, resolve_model
from .utils.files import read_json, write_json

SLA2_TENSORS = ("router_q", "router_k", "alpha_logit")
HEDGEHOG_TENSORS = ("feature_q", "feature_k")
"""The learned tensors a layer has besides :data:`SLA2_TENSORS` when its feature map is hedgehog."""
QUERY_LINEAR_TENSORS = ("alpha_weight",)
"""The learned tensor a layer has besides :data:`SLA2_TENSORS` with ``mixing: query-linear`` or ``query-block``."""
ROUTER = {"projections": "per-head d x d, no bias", "init": "identity"}
_REQUIRED_KEYS = ("layers", "block_q", "block_k", "topk", "quant")
# sla2_config.json's keys, in the order slaconv has always written them; the SLA2Config fields are the settings.
_SETTINGS = ("block_q", "block_k", "topk", "topk_per_layer", "feature_map", "quant", "alpha_granularity")
_RECORD_KEYS = ("format", "format_version", "slaconv_version", "family", "base_model", *_SETTINGS, "router",
                "layers", "recipe_hash", "calibration", "validation", "alpha_init", "budget")


@dataclass(frozen=True)
class WorkDirConfig:
    """What ``sla2_config.json`` holds: the attention settings, the converted layers, where the model came
    from and the summaries of the stages run on it."""

    attention: SLA2Config
    layers: tuple[str, ...]
    family: str = "auto"
    base_model: dict | None = None
    """``id`` (Hub id or None), ``name``, ``revision``, ``subfolder``, ``content_hash``, ``sla_checkpoint``."""
    slaconv_version: str | None = None
    recipe_hash: str | None = None
    alpha_init: dict | None = None
    """How convert set alpha: ``method`` and, for ``calibrate``, the ``selected_mass`` it measured."""
    calibration: dict | None = None
    validation: dict | None = None
    budget: dict | None = None
    """How ``convert`` allocated the per-layer top-k (``sla2.budget: per_layer``; see :mod:`slaconv.budget`):
    ``method``, ``statistic`` and per layer the blocks chosen, the uniform count and the mass each holds.  None
    (and absent from the file) for a uniform budget."""
    router: dict = field(default_factory=lambda: dict(ROUTER))
    extra: dict = field(default_factory=dict)
    """Keys this slaconv does not know (e.g. a hand-added ``license``), written back unchanged."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``sla2_config.json`` (the attention settings at the top level)."""
        settings = self.attention.to_dict()
        values = {"format": FORMAT_NAME, "slaconv_version": self.slaconv_version, "family": self.family,
                  "base_model": self.base_model, "router": self.router, "layers": list(self.layers),
                  "recipe_hash": self.recipe_hash, "calibration": self.calibration,
                  "validation": self.validation, "alpha_init": self.alpha_init, "budget": self.budget, **settings}
        out = {key: values[key] for key in _RECORD_KEYS}
        for optional in ("alpha_init", "budget"):  # absent unless set, as in the files of earlier slaconv
            if out[optional] is None:
                del out[optional]
        out.update((key, value) for key, value in settings.items() if key not in out)  # settings added later
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "sla2_config.json") -> WorkDirConfig:
        """Read :meth:`to_dict` output (or any earlier slaconv's); :class:`InputError` names what is wrong."""
        if data.get("format") != FORMAT_NAME:
            raise InputError(f"{where}: format is {data.get('format')!r}, expected {FORMAT_NAME!r}")
        version = data.get("format_version", 0)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise InputError(f"{where}: format version {version} is newer than this slaconv ({FORMAT_VERSION})")
        for key in _REQUIRED_KEYS:
            if key not in data:
                raise InputError(f"{where}: missing key '{key}'")
        layers = data["layers"]
        if not isinstance(layers, list) or not all(isinstance(name, str) for name in layers):
            raise InputError(f"{where}: layers must be a list of module names")
        try:
            attention = SLA2Config.from_dict(data, ignore_unknown=True)
        except (ValueError, TypeError) as exc:  # ConfigError, or a malformed topk_per_layer
            raise InputError(f"{where}: {exc}") from None
        known = {f.name for f in dataclasses.fields(cls)} - {"attention", "extra"}
        return cls(attention=attention, layers=tuple(layers),
                   extra={k: v for k, v in data.items() if k not in _RECORD_KEYS},
                   **{k: data[k] for k in known - {"layers"} if k in data and data[k] is not None})

    def replace(self, **changes: Any) -> WorkDirConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


class _PathIn:
    """A read-only attribute of :class:`WorkDir`: the path of the member ``name`` inside its folder."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, work: WorkDir | None, owner: type | None = None):
        return self if work is None else work.path / self.name


class WorkDir:
    """A converted model's folder (a work dir, or a package pushed to or downloaded from the Hub).

    ``WorkDir(path)`` only names the folder (e.g. one being written); :meth:`open` also checks that it
    is one.  The file names are class attributes; the diffusers ones are diffusers' own constants.
    """

    SLA2_CONFIG = "sla2_config.json"
    SLA2_STATE = "sla2.safetensors"
    RECIPE = "recipe.yaml"
    LOCAL = "local.json"
    """Machine-local facts (absolute paths) that must not be published with the model; push skips it."""
    MODEL_CONFIG = CONFIG_NAME
    WEIGHTS = SAFETENSORS_WEIGHTS_NAME
    WEIGHTS_INDEX = SAFE_WEIGHTS_INDEX_NAME
    REPORTS = "reports"
    CHECKPOINTS = "checkpoints"
    LOGS = "logs"
    VALIDATION_REPORT = f"{REPORTS}/validation.json"
    VALIDATION_MARKDOWN = f"{REPORTS}/validation.md"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"WorkDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ what a folder is

    @classmethod
    def is_workdir(cls, path: str | Path) -> bool:
        """Whether ``path`` holds an ``sla2_config.json``."""
        return (Path(path) / cls.SLA2_CONFIG).is_file()

    @classmethod
    def open(cls, path: str | Path) -> WorkDir:
        """The work dir at ``path``; :class:`InputError` when there is none."""
        path = Path(path)
        if not path.is_dir():
            raise InputError(f"work dir not found: {path}")
        if not cls.is_workdir(path):
            raise InputError(f"{path} is not a slaconv work dir (no {cls.SLA2_CONFIG}); run 'slaconv convert' first")
        return cls(path)

    @classmethod
    def check_output(cls, path: str | Path, overwrite: bool) -> None:
        """An output folder may be new, empty, or (with ``overwrite``) an earlier slaconv work dir."""
        out = Path(path)
        if not out.exists() or (out.is_dir() and not any(out.iterdir())):
            return
        if not out.is_dir():
            raise OutputExistsError(f"output path {out} exists and is not a directory")
        if not cls.is_workdir(out):
            raise OutputExistsError(f"output directory {out} already holds files that are not a slaconv work dir")
        if not overwrite:
            raise OutputExistsError(f"output directory {out} already holds a work dir (pass --overwrite to replace it)")

    # ------------------------------------------------------------------ paths

    sla2_config_path = _PathIn(SLA2_CONFIG)
    sla2_state_path = _PathIn(SLA2_STATE)
    recipe_path = _PathIn(RECIPE)
    local_path = _PathIn(LOCAL)
    model_config_path = _PathIn(MODEL_CONFIG)
    reports_dir = _PathIn(REPORTS)
    validation_report_path = _PathIn(VALIDATION_REPORT)
    validation_markdown_path = _PathIn(VALIDATION_MARKDOWN)

    def checkpoints_dir(self, stage: int) -> Path:
        """Where stage ``stage`` (1 or 2) keeps its ``checkpoint-<step>`` folders."""
        return self.path / self.CHECKPOINTS / f"stage{stage}"

    def log_path(self, stage: int) -> Path:
        """The JSON-lines log of stage ``stage`` (one record per step)."""
        return self.path / self.LOGS / f"stage{stage}.jsonl"

    # ------------------------------------------------------------------ sla2_config.json, recipe, local facts

    def read_sla2_config(self) -> WorkDirConfig:
        """``sla2_config.json``; :class:`InputError` when the folder is not an SLA2 model or the file is bad."""
        if not self.sla2_config_path.is_file():
            raise InputError(f"{self.path} is not an SLA2 model: no {self.SLA2_CONFIG}")
        return WorkDirConfig.from_dict(read_json(self.sla2_config_path), where=str(self.sla2_config_path))

    def write_sla2_config(self, config: WorkDirConfig) -> None:
        write_json(self.sla2_config_path, config.to_dict())

    def update_sla2_config(self, **changes: Any) -> WorkDirConfig:
        """Read ``sla2_config.json``, change some fields, write it back; returns the new record."""
        config = self.read_sla2_config().replace(**changes)
        self.write_sla2_config(config)
        return config

    def read_recipe(self, overrides: Mapping[str, Any] | None = None) -> Recipe | None:
        """The resolved recipe saved here (with ``overrides``), or None when there is none."""
        return load_recipe(self.recipe_path, overrides) if self.recipe_path.is_file() else None

    def write_recipe(self, recipe: Recipe) -> None:
        recipe.save(self.recipe_path)

    def read_local(self) -> dict:
        """``local.json``, or ``{}`` when absent or unreadable (it only ever holds hints)."""
        try:
            data = json.loads(self.local_path.read_text()) if self.local_path.is_file() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_local(self, data: dict) -> None:
        write_json(self.local_path, data)

    def read_model_config(self) -> dict:
        """The diffusers ``config.json``."""
        try:
            config = json.loads(self.model_config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{self.path}: missing or invalid {self.MODEL_CONFIG}") from None
        if not isinstance(config, dict):
            raise InputError(f"{self.path}: missing or invalid {self.MODEL_CONFIG}")
        return config

    def read_validation_report(self) -> dict | None:
        """``reports/validation.json`` as ``slaconv validate`` wrote it, or None before any validation."""
        return read_json(self.validation_report_path) if self.validation_report_path.is_file() else None

    # ------------------------------------------------------------------ what a validation measures

    def weight_files(self) -> list[str]:
        """The diffusers weight files: ``diffusion_pytorch_model.safetensors``, or the shard index and every
        shard it names; :class:`InputError` when there are none or a named shard is missing."""
        index = self.path / self.WEIGHTS_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise InputError(f"{index} is not a valid safetensors shard index") from None
            for shard in shards:
                if not isinstance(shard, str) or "/" in shard or not (self.path / shard).is_file():
                    raise InputError(f"{self.path}: shard {shard!r} named in {index.name} is missing")
            return [index.name, *shards]
        if (self.path / self.WEIGHTS).is_file():
            return [self.WEIGHTS]
        raise InputError(f"{self.path} holds no diffusers weights ({self.WEIGHTS} or a sharded index): "
                         "run `slaconv convert` first")

    @classmethod
    def measured_names(cls, names: Iterable[str]) -> list[str]:
        """Those of ``names`` (files of a model folder, e.g. a checksum list) that :meth:`weights_digest`
        covers: ``config.json``, the diffusers weight files and ``sla2.safetensors``, sorted."""
        stem = cls.WEIGHTS.removesuffix(".safetensors")
        return sorted(n for n in names if n in (cls.MODEL_CONFIG, cls.SLA2_STATE, cls.WEIGHTS_INDEX)
                      or fnmatch.fnmatchcase(n, f"{stem}*.safetensors"))

    def file_hashes(self) -> dict[str, str]:
        """Hex sha256 of every file :meth:`weights_digest` covers, by name (reads every byte of them)."""
        return {name: sha256_file(self.path / name)
                for name in self.measured_names([self.MODEL_CONFIG, *self.weight_files(), self.SLA2_STATE])}

    def measured_settings(self, quant: str | None = None) -> dict[str, Any]:
        """The SLA2 settings and converted layers the model runs with (``quant`` replacing the stored mode)."""
        config = self.read_sla2_config()
        attention = config.attention if quant is None else config.attention.replace(quant=quant)
        return {**attention.to_dict(), "layers": list(config.layers)}

    def weights_digest(self, quant: str | None = None) -> str:
        """The content hash of the model as it would run now: see :func:`slaconv.digest.weights_digest`."""
        return weights_digest(self.file_hashes(), self.measured_settings(quant))

    # ------------------------------------------------------------------ tensors and models

    def read_sla2_state(self) -> dict[str, torch.Tensor]:
        """The SLA2 tensors of ``sla2.safetensors`` by ``<layer>.<tensor>``."""
        if not self.sla2_state_path.is_file():
            raise InputError(f"{self.path}: no {self.SLA2_STATE} (SLA2 tensors)")
        try:
            return load_file(str(self.sla2_state_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"{self.sla2_state_path} is not a readable safetensors file: {exc}") from None

    def save_model(self, model: torch.nn.Module, family: Family) -> None:
        """Plain diffusers weights (stock processors) + ``sla2.safetensors`` into this folder."""
        with stock_processors(model, family):
            # the class's method: slaconv replaces the instance's with one that writes this whole layout
            type(model).save_pretrained(model, self.path, safe_serialization=True)
        save_file(sla2_state_dict(model), str(self.sla2_state_path), metadata={"format": FORMAT_NAME})

    def load_model(self, *, dtype: str = "float32", device: str | torch.device = "cpu",
                   quant: str | None = None) -> tuple[torch.nn.Module, Family, WorkDirConfig]:
        """(model with SLA2 installed and its tensors loaded, family, ``sla2_config.json``).

        ``quant`` replaces the stored low-bit mode of the sparse branch."""
        config = self.read_sla2_config()
        attention = config.attention if quant is None else config.attention.replace(quant=quant)  # checked first
        model_config = self.read_model_config()
        family = detect_family(model_config, config.family)
        model = load_model(ModelSource(self.path, None, None, model_config), family, dtype=dtype, device=device)
        modules = dict(model.named_modules())
        unknown = [name for name in config.layers if name not in modules]
        if unknown:
            raise InputError(f"{self.SLA2_CONFIG} names layer '{unknown[0]}' that this model does not have")
        install_sla2(model, family, list(config.layers), attention)
        apply_sla2_state(model, self.read_sla2_state(), where=str(self.sla2_state_path))
        return model, family, config

    def check_same_architecture(self, model_config: Mapping[str, Any], name: str) -> None:
        """Raise :class:`InputError` naming the first setting in which ``model_config`` (another model's
        ``config.json``) differs from this model's: the class and every setting both files record (diffusers'
        other bookkeeping keys, ``_...``, and keys only one version of diffusers writes are ignored)."""
        ours = self.read_model_config()
        keys = ["_class_name"] + sorted(k for k in set(ours) & set(model_config) if not k.startswith("_"))
        for key in keys:
            if ours.get(key) != model_config.get(key):
                raise InputError(f"{name} is not the architecture this model was converted from: {key} is "
                                 f"{model_config.get(key)!r} there, {ours.get(key)!r} here")

    def load_base_model(self, *, dtype: str, device, base: str | None = None,
                        verify: bool = True) -> torch.nn.Module:
        """The original model this work dir was converted from.

        Tried in order: ``base`` if given; the local folder recorded at convert time (checked against
        the recorded content hash, so a changed checkpoint is not silently used; ``verify=False`` skips
        that check for a caller that already made it in this run); the Hub id and revision recorded in
        ``sla2_config.json``.
        """
        info = self.read_sla2_config().base_model or {}
        if base:
            source = resolve_model(base)
            self.check_same_architecture(source.config, base)
            return load_model(source, dtype=dtype, device=device)
        local = self.read_local().get("base_path")
        if local and Path(local).is_dir():
            source = resolve_model(local)
            if verify and info.get("content_hash") and content_hash(source.path) != info["content_hash"]:
                raise InputError(f"the base model at {local} changed since convert (content hash differs); "
                                 "pass --base")
            return load_model(source, dtype=dtype, device=device)
        if info.get("id"):
            return load_model(resolve_model(info["id"], subfolder=info.get("subfolder"),
                                            revision=info.get("revision")), dtype=dtype, device=device)
        raise InputError(f"the original model is no longer at {local!r} and has no Hub id; pass --base")


def sla2_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{"<layer>.<tensor>": fp32 tensor}`` for every installed SLA2 processor."""
    state = {}
    for name, proc in sla2_processors(model).items():
        for key, tensor in proc.sla2_state().items():
            state[f"{name}.{key}"] = tensor.detach().float().cpu().contiguous()
    return state


def apply_sla2_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str = "SLA2 state") -> None:
    """Copy SLA2 tensors into installed processors; missing, extra or mis-shaped keys are errors."""
    procs = sla2_processors(model)
    expected = {f"{n}.{t}": tensor for n, p in procs.items() for t, tensor in p.sla2_state().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        raise InputError(f"{where}: missing SLA2 tensors, e.g. {missing[0]} ({len(missing)} missing)")
    if extra:
        raise InputError(f"{where}: unexpected SLA2 tensors, e.g. {extra[0]} ({len(extra)} extra)")
    for key, param in expected.items():
        if tuple(state[key].shape) != tuple(param.shape):
            raise InputError(f"{where}: {key} has shape {tuple(state[key].shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(state[key].to(param.dtype))


def new_config(*, attention: SLA2Config, family: Family, layers: list[str], recipe_hash: str, base: dict,
               alpha_init: dict, budget: dict | None = None) -> WorkDirConfig:
    """The ``sla2_config.json`` record of a freshly converted model (no stage run yet)."""
    return WorkDirConfig(attention=attention, layers=tuple(layers), family=family.name, base_model=base,
                         slaconv_version=__version__, recipe_hash=recipe_hash, alpha_init=alpha_init, budget=budget)
