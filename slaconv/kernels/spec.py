"""What one SLA2 attention call computes, beside its tensors: defined and checked here, once.

:class:`AttentionSpec` is what :func:`slaconv.kernels.ops.sla2_attention` builds from its keyword
arguments and what the Triton driver takes; the reference takes the same four settings by name.
The allowed values come from :mod:`slaconv.config`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import BLOCK_SIZES, QUANT_MODES, ConfigError
from .reference import check_always_kept, selection_count

LAYOUTS = ("bnhd", "bhnd")
"""Tensor layouts the kernels read through strides: (B, N, H, D) as diffusers passes them, or (B, H, N, D)."""


@dataclass(frozen=True)
class AttentionSpec:
    """The settings of one SLA2 attention call (docs/design.md section 1).

    ``topk`` is the fraction of key blocks each query block attends to exactly (the rest go to the linear
    branch; at least one block is kept); ``block_q`` and ``block_k`` are the query and key block sizes in
    tokens; ``quant`` is the precision of the sparse branch's two products: ``none`` (16-bit), ``int8``
    (INT8 QK^T) or ``int8-fp8`` (INT8 QK^T and FP8 PV); ``always_kept`` is a key-block range
    ``[start, end)`` that every query block attends to exactly besides its top-k of the other blocks (the
    text keys of joint attention; docs/design.md section 1).  A block size or mode out of range raises
    :class:`slaconv.config.ConfigError` (a ``ValueError``) naming it.
    """

    topk: float
    block_q: int = 128
    block_k: int = 64
    quant: str = "none"
    always_kept: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k"):
            if getattr(self, name) not in BLOCK_SIZES:
                raise ConfigError(f"block sizes must be one of {BLOCK_SIZES}, got {name}={getattr(self, name)!r}")
        if self.quant not in QUANT_MODES:
            raise ConfigError(f"quant must be one of {QUANT_MODES}, got {self.quant!r}")
        start, end = self.always_kept
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise ConfigError(f"always_kept must be a key-block range (start, end), got {self.always_kept!r}")

    def selected_blocks(self, n_kblocks: int) -> int:
        """Key blocks each query block attends to: the ``always_kept`` range plus
        ``clamp(round(topk * m), 1, m)`` of the ``m`` other blocks."""
        check_always_kept(self.always_kept, n_kblocks)
        return selection_count(self.topk, n_kblocks, self.always_kept)


def check_layout(layout: str) -> None:
    """Raise ``ValueError`` unless ``layout`` is one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
