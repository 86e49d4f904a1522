"""One entry point for SLA2 attention: picks the Triton kernel on CUDA, the reference elsewhere.

Pipeline code calls :func:`sla2_attention` only, so kernels drop in without touching it.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import reference

LAYOUTS = ("bnhd", "bhnd")
SUPPORTED_HEAD_DIMS = (64, 128)


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
        warnings.warn(f"SLA2: head dim {head_dim} is not one the Triton kernels take {SUPPORTED_HEAD_DIMS}; "
                      "running the PyTorch reference on the GPU (correct, much slower)", stacklevel=3)


def choose_backend(q: torch.Tensor, *, soft: bool, partial: bool, requested: str = "auto") -> str:
    """``triton`` when the tensors are on CUDA and the call is one the kernels cover, else ``reference``.

    ``SLACONV_BACKEND=reference|triton`` overrides ``auto`` (useful to compare the two).
    """
    if requested == "auto":
        requested = os.environ.get("SLACONV_BACKEND", "auto")
    if requested == "reference":
        return "reference"
    kernel_ok = (
        _kernel_backend() is not None
        and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
        and q.shape[-1] in SUPPORTED_HEAD_DIMS
        and not soft
        and not partial
    )
    if requested == "triton":
        if not kernel_ok:
            raise RuntimeError("the Triton SLA2 kernel cannot run this call (device, head dim or mode)")
        return "triton"
    if q.is_cuda and not kernel_ok and not soft and not partial and q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        _warn_reference_on_gpu(q.shape[-1])
    return "triton" if kernel_ok and q.is_cuda else "reference"


def sla2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    router_q: torch.Tensor,
    router_k: torch.Tensor,
    alpha_logit: torch.Tensor,
    *,
    topk: float,
    block_q: int = 128,
    block_k: int = 64,
    quant: str = "none",
    layout: str = "bnhd",
    soft_tau: float | None = None,
    q_blocks: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """SLA2 attention (DESIGN.md section 1) on Q, K, V in ``layout`` ("bnhd" as diffusers passes
    them, or "bhnd"); returns the output in the same layout and dtype.

    ``soft_tau`` switches to SoftTop-k (stage-1 calibration) and ``q_blocks`` computes only the
    given query blocks; both run on the reference path.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    chosen = choose_backend(q, soft=soft_tau is not None, partial=q_blocks is not None, requested=backend)
    if chosen == "triton":
        return _kernel_backend().sla2_attention_triton(
            q, k, v, router_q, router_k, alpha_logit,
            topk=topk, block_q=block_q, block_k=block_k, quant=quant, layout=layout,
        )
    if layout == "bnhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = reference.sla2_attention_reference(
        q, k, v, router_q, router_k, alpha_logit,
        topk=topk, block_q=block_q, block_k=block_k, quant=quant, soft_tau=soft_tau, q_blocks=q_blocks,
    )
    return out.transpose(1, 2) if layout == "bnhd" else out
