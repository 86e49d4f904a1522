"""One entry point for SLA2 attention: picks the Triton kernel on CUDA, the reference elsewhere.

Pipeline code calls :func:`sla2_attention` only, so kernels drop in without touching it.
"""

from __future__ import annotations

import os
import warnings

import torch

from ..config import KERNEL_HEAD_DIMS
from . import reference
from .launch import LaunchConfig
from .spec import AttentionSpec, check_layout


def _kernel_backend():
    """The Triton implementation, or None where Triton itself is not installed.

    Only a missing ``triton`` package is tolerated: an error inside the kernel module propagates,
    so a broken kernel can never silently fall back to the (slow) reference.
    """
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    from . import sla2_triton

    return sla2_triton


_warned_head_dims: set[int] = set()


def _warn_reference_on_gpu(head_dim: int) -> None:
    if head_dim not in _warned_head_dims:
        _warned_head_dims.add(head_dim)
        warnings.warn(f"SLA2: head dim {head_dim} is not one the Triton kernels take {KERNEL_HEAD_DIMS}; "
                      "running the PyTorch reference on the GPU (correct, much slower)", stacklevel=3)


def choose_backend(q: torch.Tensor, *, soft: bool, partial: bool, requested: str = "auto") -> str:
    """``triton`` when the tensors are on CUDA and the call is one the kernels cover, else ``reference``.

    The kernels cover hard top-k over every query block, with softmax or Hedgehog features.

    ``SLACONV_BACKEND=reference|triton`` overrides ``auto`` (useful to compare the two).
    """
    if requested == "auto":
        requested = os.environ.get("SLACONV_BACKEND", "auto")
    if requested == "reference":
        return "reference"
    kernel_ok = (
        _kernel_backend() is not None
        and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
        and q.shape[-1] in KERNEL_HEAD_DIMS
        and not soft
        and not partial
    )
    if requested == "triton":
        if not kernel_ok:
            raise RuntimeError("the Triton SLA2 kernel cannot run this call (device, head dim or mode)")
        return "triton"
    if q.is_cuda and not kernel_ok and not soft and not partial and q.shape[-1] not in KERNEL_HEAD_DIMS:
        _warn_reference_on_gpu(q.shape[-1])
    return "triton" if kernel_ok and q.is_cuda else "reference"


def sla2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, router_q: torch.Tensor,
                   router_k: torch.Tensor, alpha_logit: torch.Tensor, *, topk: float, block_q: int = 128,
                   block_k: int = 64, quant: str = "none", layout: str = "bnhd", soft_tau: float | None = None,
                   q_blocks: torch.Tensor | None = None, backend: str = "auto",
                   launch: LaunchConfig | None = None, always_kept: tuple[int, int] = (0, 0),
                   feature_q: torch.Tensor | None = None, feature_k: torch.Tensor | None = None,
                   mixing: str = "head", linear_keys: str = "unselected",
                   alpha_weight: torch.Tensor | None = None) -> torch.Tensor:
    """SLA2 attention (docs/design.md section 1) on Q, K, V in ``layout`` ("bnhd" as diffusers passes
    them, or "bhnd"); returns the output in the same layout and dtype.

    ``router_q``, ``router_k`` (H, D, D) and ``alpha_logit`` (H,) are the layer's learned parameters;
    ``topk``, ``block_q``, ``block_k``, ``quant`` and ``always_kept`` are the fields of :class:`AttentionSpec`
    (documented and checked there).  ``soft_tau`` switches to SoftTop-k (stage-1 calibration) and ``q_blocks``
    computes only the given query blocks; both run on the reference path.  ``launch`` sets the Triton
    launches' tiles, warps and stages (:class:`slaconv.kernels.launch.LaunchConfig`; the measured
    defaults if None); the reference ignores it.  ``feature_q``, ``feature_k`` (H, D, D/2): the hedgehog
    feature map's weights (:func:`slaconv.kernels.reference.feature_map`), both or neither.
    ``mixing``: ``head`` (alpha per head), ``query`` (alpha per query row from the estimated tail mass),
    ``query-linear`` (alpha per query row from the query and ``alpha_weight`` (H, D)) or ``query-block`` (from
    both, the tail mass estimated per query block; :data:`slaconv.config.MIXINGS`).  ``linear_keys``:
    ``unselected`` (the linear branch over the key blocks a query block did not select) or ``all`` (over every
    key block: no per-block state; :data:`slaconv.config.LINEAR_KEYS`).
    """
    spec = AttentionSpec(topk, block_q, block_k, quant, tuple(always_kept))
    check_layout(layout)
    chosen = choose_backend(q, soft=soft_tau is not None, partial=q_blocks is not None, requested=backend)
    if chosen == "triton":
        return _kernel_backend().sla2_attention_triton(
            q, k, v, router_q, router_k, alpha_logit, spec, layout=layout, launch=launch,
            feature_q=feature_q, feature_k=feature_k, mixing=mixing, linear_keys=linear_keys,
            alpha_weight=alpha_weight,
        )
    if layout == "bnhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = reference.sla2_attention_reference(
        q, k, v, router_q, router_k, alpha_logit, topk=spec.topk, block_q=spec.block_q, block_k=spec.block_k,
        quant=spec.quant, soft_tau=soft_tau, q_blocks=q_blocks, always_kept=spec.always_kept,
        feature_q=feature_q, feature_k=feature_k, mixing=mixing, linear_keys=linear_keys, alpha_weight=alpha_weight,
    )
    return out.transpose(1, 2) if layout == "bnhd" else out
