"""The family-independent half of an SLA2 attention processor.

An :class:`SLA2Processor` is an ``nn.Module`` so its parameters (``router_q``, ``router_k``
[H, d, d], ``alpha_logit`` [H], with the hedgehog feature map ``feature_q``, ``feature_k`` [H, d, d/2], and with
``mixing: query-linear`` or ``query-block`` ``alpha_weight`` [H, d], all fp32) live in the model's state and follow ``.to()``,
``requires_grad_`` and wrappers such as FSDP.  A family subclass computes Q, K, V exactly as the
stock processor does and calls :meth:`attend` (self-attention) or :meth:`attend_joint` (text and
visual tokens in one sequence), which run SLA2 (or dense attention while the processor is in
``dense`` mode) and let an optional observer see the tensors first.

Joint attention (docs/design.md section 1, "Joint text-visual attention"): text tokens are never
sparsified.  Text queries attend to every key densely, and the key blocks holding text are an
always-kept range of every query block's selection, so routing, the linear branch and alpha act on
the visual-to-visual part only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ROW_WEIGHT_MIXINGS, SLA2Config
from .kernels import reference
from .kernels.ops import sla2_attention

MODES = ("sla2", "dense")
Observer = Callable[["SLA2Processor", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None]
NO_TEXT = (0, 0)


@dataclass(frozen=True)
class JointText:
    """The text of one forward call of a joint-attention model, as its forward arguments give it (set on
    every SLA2 processor by a forward pre-hook, for layers whose processor cannot see it)."""

    tokens: int
    """Text tokens in the sequence (padding included)."""
    valid: tuple[int, ...] | None = None
    """Per sample, the real text tokens (the first ones; the rest is padding no query attends to), or None
    when every text token is real."""


class RotaryCallSignature:
    """Mixin for processors of diffusers' legacy ``Attention``, which passes a keyword argument on only if the
    processor's ``__call__`` names it (an ``nn.Module``'s generic one names none): this one names the rotary
    embedding beside the usual arguments."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


def hedgehog_init(heads: int, head_dim: int) -> torch.Tensor:
    """Starting Hedgehog weights (H, d, d/2): the first d/2 columns of the identity, per head.

    Then ``phi(x) = [softmax(x[:d/2]), softmax(-x[:d/2])]``: a softmax map over half the head dim plus its
    mirror, close to the softmax map the linear branch uses without learned weights."""
    eye = torch.eye(head_dim, dtype=torch.float32)[:, : head_dim // 2]
    return eye.expand(heads, head_dim, head_dim // 2).clone()


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
        config = config if config is not None else SLA2Config()
        if config.feature_map == "hedgehog":
            if head_dim % 2:
                raise ValueError(f"the hedgehog feature map needs an even head dim, got {head_dim}")
            self.feature_q = torch.nn.Parameter(hedgehog_init(heads, head_dim))
            self.feature_k = torch.nn.Parameter(hedgehog_init(heads, head_dim))
        else:
            self.feature_q = self.feature_k = None
        # zero: alpha starts per head, sigmoid(alpha_logit), and stage 1 learns how it varies with the query
        self.alpha_weight = (torch.nn.Parameter(torch.zeros(heads, head_dim))
                             if config.mixing in ROW_WEIGHT_MIXINGS else None)
        self.layer_name = layer_name
        self.config = config
        self.mode = "sla2"
        self.observer: Observer | None = None
        self.text_span: tuple[int, int] = NO_TEXT
        """Token range [start, stop) of the text in the Q, K, V an observer is shown (joint attention);
        (0, 0) otherwise.  :meth:`sparse_attention` and :meth:`block_mask` read it when not told."""
        self.joint_text: JointText | None = None
        """What the model's forward pre-hook said about the current call's text (joint families only)."""

    @property
    def config(self) -> SLA2Config:
        """How attention runs; assigning a new one also resolves this layer's :attr:`topk`."""
        return self._config

    @config.setter
    def config(self, config: SLA2Config) -> None:
        if (config.feature_map == "hedgehog") != (self.feature_q is not None):
            raise ValueError(f"{self.layer_name or 'SLA2 processor'}: cannot switch the feature map to "
                             f"{config.feature_map!r} on an installed processor (its learned state differs)")
        if (config.mixing in ROW_WEIGHT_MIXINGS) != (self.alpha_weight is not None):
            raise ValueError(f"{self.layer_name or 'SLA2 processor'}: cannot switch the mixing to "
                             f"{config.mixing!r} on an installed processor (its learned state differs)")
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
                f"blocks=({self.block_q}, {self.block_k}), quant={self.quant}, mixing={self.config.mixing}, "
                f"linear_keys={self.config.linear_keys}, "
                f"mode={self.mode}")

    def sla2_state(self) -> dict[str, torch.Tensor]:
        """The learned tensors by name: ``router_q``, ``router_k``, ``alpha_logit`` (and ``feature_q``,
        ``feature_k`` with the hedgehog feature map, ``alpha_weight`` with ``mixing: query-linear`` or
        ``query-block``)."""
        state = {"router_q": self.router_q, "router_k": self.router_k, "alpha_logit": self.alpha_logit}
        if self.feature_q is not None:
            state.update(feature_q=self.feature_q, feature_k=self.feature_k)
        if self.alpha_weight is not None:
            state.update(alpha_weight=self.alpha_weight)
        return state

    def always_kept(self, text_span: tuple[int, int] | None = None) -> tuple[int, int]:
        """The key-block range [start, end) holding the tokens of ``text_span`` (default :attr:`text_span`)."""
        start, stop = self.text_span if text_span is None else text_span
        if start == stop:
            return NO_TEXT
        return start // self.block_k, -(-stop // self.block_k)

    def sparse_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                         text_span: tuple[int, int] | None = None, **kwargs) -> torch.Tensor:
        """SLA2 with this layer's parameters and settings on (B, N, H, D) tensors; ``kwargs`` go to
        :func:`slaconv.kernels.ops.sla2_attention` (e.g. ``soft_tau`` for SoftTop-k, ``q_blocks``, or another
        ``quant``).  With text in the sequence (``text_span``, default :attr:`text_span`) its key blocks are
        always kept and its query rows are dense attention over every key."""
        span = self.text_span if text_span is None else text_span
        kwargs.setdefault("quant", self.quant)
        out = sla2_attention(
            q, k, v, self.router_q, self.router_k, self.alpha_logit, topk=self.topk, block_q=self.block_q,
            block_k=self.block_k, layout="bnhd", always_kept=self.always_kept(span), feature_q=self.feature_q,
            feature_k=self.feature_k, mixing=self.config.mixing, linear_keys=self.config.linear_keys,
            alpha_weight=self.alpha_weight, **kwargs,
        )
        start, stop = span
        if start == stop:
            return out
        q_blocks = kwargs.get("q_blocks")
        if q_blocks is None:
            dense = self.dense_attention(q[:, start:stop], k, v).to(out.dtype)
            return torch.cat([out[:, :start], dense, out[:, stop:]], dim=1)
        # the rows of the given query blocks, as the reference returns them
        rows = (q_blocks.view(-1, 1) * self.block_q + torch.arange(self.block_q, device=q.device)).view(-1)
        rows = rows[rows < q.shape[1]]
        text = torch.nonzero((rows >= start) & (rows < stop)).view(-1)
        dense = self.dense_attention(q[:, rows[text]], k, v).to(out.dtype)
        return out.index_copy(1, text, dense)

    @staticmethod
    def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Full softmax attention on (B, N, H, D) tensors (torch SDPA)."""
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    def block_mask(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The hard block mask (B, H, n_qblocks, n_kblocks) SLA2 attends to exactly on (B, N, H, D) Q and K:
        the router's top-k plus the key blocks of :attr:`text_span`."""
        qh, kh = q.transpose(1, 2), k.transpose(1, 2)
        scores = reference.router_scores(qh, kh, self.router_q, self.router_k, self.block_q, self.block_k)
        return reference.selection_mask(scores, self.topk, self.always_kept())

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               text_span: tuple[int, int] = NO_TEXT) -> torch.Tensor:
        """The observer's result if it returns one, else dense or SLA2 attention as ``mode`` says.

        ``text_span`` is the token range of text in the sequence (:meth:`attend_joint` passes it); an
        observer sees it as :attr:`text_span`."""
        if self.observer is not None:
            self.text_span = text_span
            try:
                out = self.observer(self, q, k, v)
            finally:
                self.text_span = NO_TEXT
            if out is not None:
                return out
        if self.mode == "dense":
            return self.dense_attention(q, k, v)
        return self.sparse_attention(q, k, v, text_span=text_span)

    @property
    def runs_stock_attention(self) -> bool:
        """Dense mode and no observer: the family processor calls the stock attention function itself (so
        the result is bit-identical to the stock processor's, masks included)."""
        return self.mode == "dense" and self.observer is None

    def attend_joint(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, text_tokens: int,
                     text_first: bool, text_valid: tuple[int, ...] | None = None) -> torch.Tensor:
        """Attention over a sequence of text and visual tokens (B, N, H, D), text first or last.

        Text query rows are dense attention over every key; every visual query keeps every text key exactly
        and routes among the visual key blocks.  The visual segment starts on a block boundary: text placed
        first is moved behind it unless it fills whole query and key blocks.  ``text_valid`` (text last only)
        gives, per sample, how many text tokens are real; padding keys take no part, so each sample with
        padding is attended on its own, cut to its real tokens."""
        n = q.shape[1]
        if text_valid is not None and any(t < text_tokens for t in text_valid):
            if text_first:
                raise ValueError(f"{self.layer_name or 'SLA2 processor'}: padded text must follow the visual tokens")
            outs = []
            for i, valid in enumerate(text_valid):
                end = n - text_tokens + valid
                qi, ki, vi = q[i:i + 1], k[i:i + 1, :end], v[i:i + 1, :end]
                out = self.attend(qi[:, :end], ki, vi, text_span=(end - valid, end))
                if end < n:  # padding queries: dense over the real keys, as the masked stock call gives them
                    out = torch.cat([out, self.dense_attention(qi[:, end:], ki, vi).to(out.dtype)], dim=1)
                outs.append(out)
            return torch.cat(outs, dim=0)
        if not text_first:
            return self.attend(q, k, v, text_span=(n - text_tokens, n))
        if text_tokens % self.block_q == 0 and text_tokens % self.block_k == 0:
            return self.attend(q, k, v, text_span=(0, text_tokens))
        visual = n - text_tokens
        q, k, v = (torch.cat([t[:, text_tokens:], t[:, :text_tokens]], dim=1) for t in (q, k, v))
        out = self.attend(q, k, v, text_span=(visual, n))
        return torch.cat([out[:, visual:], out[:, :visual]], dim=1)
