"""The family-independent half of an SLA2 attention processor.

An :class:`SLA2Processor` is an ``nn.Module`` so its parameters (``router_q``, ``router_k``
[H, d, d], ``alpha_logit`` [H], all fp32) live in the model's state and follow ``.to()``,
``requires_grad_`` and wrappers such as FSDP.  A family subclass computes Q, K, V exactly as the
stock processor does and calls :meth:`attend`, which runs SLA2 (or dense attention while the
processor is in ``dense`` mode) and lets an optional observer see the tensors first.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .config import SLA2Config
from .kernels.ops import sla2_attention

MODES = ("sla2", "dense")
Observer = Callable[["SLA2Processor", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None]


class SLA2Processor(torch.nn.Module):
    """SLA2 state and dispatch for one self-attention layer (tensors in (B, N, H, D) layout)."""

    # Keep diffusers' set_attention_backend()/context-parallel plumbing working.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, heads: int, head_dim: int, config: SLA2Config | None = None, *, layer_name: str = "",
                 alpha: float = 0.5):
        """Identity router, every head's alpha at ``alpha``; ``config`` (default :class:`SLA2Config`) says how
        attention runs and ``layer_name`` picks this layer's top-k from it."""
        super().__init__()
        eye = torch.eye(head_dim, dtype=torch.float32).expand(heads, head_dim, head_dim).clone()
        self.router_q = torch.nn.Parameter(eye.clone())
        self.router_k = torch.nn.Parameter(eye)
        self.alpha_logit = torch.nn.Parameter(torch.full((heads,), math.log(alpha / (1 - alpha))))
        self.heads, self.head_dim = heads, head_dim
        self.layer_name = layer_name
        self.config = config if config is not None else SLA2Config()
        self.mode = "sla2"
        self.observer: Observer | None = None

    @property
    def config(self) -> SLA2Config:
        """How attention runs; assigning a new one also resolves this layer's :attr:`topk`."""
        return self._config

    @config.setter
    def config(self, config: SLA2Config) -> None:
        self._config = config
        # A plain float, not a lookup by layer name: torch.compile then guards on the value, which every
        # layer shares, instead of on the name, which would recompile each block.
        self.topk: float = config.topk_for(self.layer_name)
        """This layer's fraction of key blocks attended exactly."""

    @property
    def block_q(self) -> int:
        return self.config.block_q

    @property
    def block_k(self) -> int:
        return self.config.block_k

    @property
    def quant(self) -> str:
        return self.config.quant

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, head_dim={self.head_dim}, topk={self.topk}, "
                f"blocks=({self.block_q}, {self.block_k}), quant={self.quant}, mode={self.mode}")

    def sla2_state(self) -> dict[str, torch.Tensor]:
        """The learned tensors by name: ``router_q``, ``router_k``, ``alpha_logit``."""
        return {"router_q": self.router_q, "router_k": self.router_k, "alpha_logit": self.alpha_logit}

    def sparse_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
        """SLA2 with this layer's parameters and settings on (B, N, H, D) tensors; ``kwargs`` go to
        :func:`slaconv.kernels.ops.sla2_attention` (e.g. ``soft_tau`` for SoftTop-k, or another ``quant``)."""
        kwargs.setdefault("quant", self.quant)
        return sla2_attention(
            q, k, v, self.router_q, self.router_k, self.alpha_logit,
            topk=self.topk, block_q=self.block_q, block_k=self.block_k, layout="bnhd", **kwargs,
        )

    @staticmethod
    def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Full softmax attention on (B, N, H, D) tensors (torch SDPA)."""
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The observer's result if it returns one, else dense or SLA2 attention as ``mode`` says."""
        if self.observer is not None:
            out = self.observer(self, q, k, v)
            if out is not None:
                return out
        if self.mode == "dense":
            return self.dense_attention(q, k, v)
        return self.sparse_attention(q, k, v)
