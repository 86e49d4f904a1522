"""The SLA2 attention settings of a converted model: one typed source of truth.

:class:`SLA2Config` is what the processor runs with, what :func:`slaconv.sla2_` installs, what the
work dir's ``sla2_config.json`` stores (beside provenance and summaries) and what the CLI's choices
and the kernels' checks are built from.  The tuples below are the values each setting may take.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError

FORMAT_NAME = "slaconv-sla2"
FORMAT_VERSION = 2
"""The newest format this slaconv reads and writes.  Version 2 adds ``token_tile``, which a reader that ignores it
would run with wrong block groups; a model is written as version 1 unless it uses a version-2 setting, so
earlier slaconv releases keep reading every model they can run and refuse the others by name."""

QUANT_MODES = ("none", "int8", "int8-fp8")
"""Low-bit forward of the sparse branch: bf16, INT8 QK^T with bf16 PV, INT8 QK^T with FP8 PV."""
BLOCK_SIZES = (64, 128)
"""Query and key block sizes the kernels are built for."""
KERNEL_HEAD_DIMS = (64, 128)
"""Head dims the Triton kernels take; other head dims run the PyTorch reference."""
FEATURE_MAPS = ("softmax", "hedgehog")
"""The linear branch's feature map phi: softmax over the head dimension, or the learned Hedgehog map
``[softmax(x W), softmax(-x W)]`` with one (d, d/2) weight per head, untied for queries and keys."""
BUDGETS = ("uniform", "per_layer", "per_layer_tail")
"""How a recipe's ``topk`` is spent over the layers: the same in every layer, or allocated per layer at convert
time from calibration samples (:mod:`slaconv.budget`): each block where it holds the most attention mass, or
blocks in proportion to the mass a layer's uniform count leaves out."""
ALPHA_GRANULARITIES = ("head",)
"""How finely the sparse/linear mixing ratio alpha is learned: one per (layer, head)."""
MIXINGS = ("head", "query", "query-linear", "query-block")
"""How the mix ``alpha O_s + (1 - alpha) O_l`` takes alpha: one per head, ``sigmoid(alpha_logit)``; one per
query row, ``sigmoid(lse_sel - lse_tail + alpha_logit)`` from the sparse branch's log row sum and a block-pooled
estimate of the unselected keys' softmax mass; one per query row from the query alone,
``sigmoid(q . alpha_weight / sqrt(d) + alpha_logit)`` with a learned (d,) weight per head; or one per query row
from both, with the tail's mass pooled once per query block from its mean query,
``sigmoid(lse_sel - lse_pool_block + q . alpha_weight / sqrt(d) + alpha_logit)`` (docs/design.md section 1)."""
ROW_WEIGHT_MIXINGS = ("query-linear", "query-block")
"""The mixings with a learned (H, d) ``alpha_weight`` per layer."""


LINEAR_KEYS = ("unselected", "all")
"""Which key blocks the linear branch covers: those a query block did not select (the SLA2 paper; a d x d state
per query block, built from the routing), or every key block (one state per head, nothing per block to build;
the selected blocks' share of the linear estimate is left to alpha; docs/design.md section 1)."""


WRITTEN_WHEN_SET = ("mixing", "linear_keys", "token_tile")
"""Settings :meth:`SLA2Config.to_dict` leaves out at their default (work dirs written before them read the same)."""


class ConfigError(UsageError, ValueError):
    """An SLA2 setting is unknown or out of range (the message names it).

    A :class:`ValueError` for library callers; on the command line a usage error (exit 2)."""


def _is_fraction(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and 0 < value <= 1)


@dataclass(frozen=True)
class SLA2Config:
    """How SLA2 attention runs in every converted layer.

    ``topk`` is the fraction of key blocks each query block attends to exactly (0.05 = 95% sparsity);
    ``topk_per_layer`` overrides it for named layers.  Instances are immutable and checked on creation.
    """

    topk: float = 0.05
    block_q: int = 128
    block_k: int = 64
    quant: str = "int8-fp8"
    feature_map: str = "softmax"
    alpha_granularity: str = "head"
    mixing: str = "head"
    linear_keys: str = "unselected"
    topk_per_layer: Mapping[str, float] = field(default_factory=dict)
    token_tile: tuple[int, int, int] | None = None
    """Video tokens regrouped into tiles of (frames, rows, columns) before attention, so that a block is a compact
    piece of the video (:mod:`slaconv.token_order`); None keeps the model's raster order."""
    format_version: int = 1
    """The format the settings are written in: 1, or 2 where a version-2 setting is used (raised on creation)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "topk_per_layer", dict(self.topk_per_layer))
        if isinstance(self.token_tile, list):
            object.__setattr__(self, "token_tile", tuple(self.token_tile))
        if self.token_tile is not None and isinstance(self.format_version, int):
            object.__setattr__(self, "format_version", max(self.format_version, 2))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first setting that is out of range."""
        if not _is_fraction(self.topk):
            raise ConfigError(f"topk must be in (0, 1], got {self.topk!r}")
        for name, value in self.topk_per_layer.items():
            if not isinstance(name, str) or not _is_fraction(value):
                raise ConfigError(f"topk_per_layer['{name}'] must be in (0, 1], got {value!r}")
        for key in ("block_q", "block_k"):
            if getattr(self, key) not in BLOCK_SIZES:
                raise ConfigError(f"{key} must be one of {BLOCK_SIZES}, got {getattr(self, key)!r}")
        choices = {"quant": QUANT_MODES, "feature_map": FEATURE_MAPS, "alpha_granularity": ALPHA_GRANULARITIES,
                   "mixing": MIXINGS, "linear_keys": LINEAR_KEYS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        tile = self.token_tile
        if tile is not None and not (isinstance(tile, tuple) and len(tile) == 3
                                     and all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in tile)):
            raise ConfigError(f"token_tile must be three positive integers (frames, rows, columns), got {tile!r}")
        if not isinstance(self.format_version, int) or not 1 <= self.format_version <= FORMAT_VERSION:
            raise ConfigError(f"format_version {self.format_version!r} is not one this slaconv reads "
                              f"(1 to {FORMAT_VERSION})")

    def topk_for(self, layer: str) -> float:
        """The top-k fraction of one layer (its per-layer override, else the global one)."""
        return self.topk_per_layer.get(layer, self.topk)

    def replace(self, **changes: Any) -> SLA2Config:
        """A copy with some settings changed (checked like a new instance)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready mapping; :meth:`from_dict` reads it back.

        Settings added after the format was first written (:data:`WRITTEN_WHEN_SET`) appear only when they differ
        from their default, so a model that does not use them keeps the same ``sla2_config.json`` and digests."""
        out = dataclasses.asdict(self)
        out["topk_per_layer"] = dict(self.topk_per_layer)
        if self.token_tile is not None:
            out["token_tile"] = list(self.token_tile)
        for name in WRITTEN_WHEN_SET:
            if out[name] == _DEFAULTS[name]:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, ignore_unknown: bool = False) -> SLA2Config:
        """Build from :meth:`to_dict` output.  Unknown keys are an error unless ``ignore_unknown``
        (a work dir's ``sla2_config.json`` also holds provenance and summaries)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown and not ignore_unknown:
            raise ConfigError(f"unknown SLA2 setting '{unknown[0]}' (known: {', '.join(sorted(names))})")
        return cls(**{k: v for k, v in data.items() if k in names})


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SLA2Config)}
