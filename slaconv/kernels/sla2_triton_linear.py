"""Host side of the linear branch's two options in the Triton kernels: the Hedgehog feature map and
alpha per query (``mixing="query"``).  ``sla2_triton.py`` calls these around its launches.

* **Hedgehog** ``phi(x) = [softmax(x W), softmax(-x W)]`` with W (H, D, D/2) per head.  The kernels take
  the signed stack ``[W, -W]`` (H, D, D) in the input dtype, so one MMA per tile gives both halves' logits
  (:func:`signed_weights`).  Their backward's linear launches form dX with one more MMA per tile and also
  write the gradient of the stacked logits; the stack's gradient, a reduction over every token, is a
  batched GEMM here (:func:`signed_weight_grad`).
* **Per-query mixing**: ``alpha_i = sigmoid(LSE_sel_i - LSE_tail_i + alpha_logit_h)``.  The sparse launch
  has LSE_sel (its own running max and sum); LSE_tail, over the key blocks a row's query block did not
  select, comes from ``tail_lse_kernel`` (:func:`tail_lse`), one pass of 1/block_k the cost of a dense
  Q K^T.  ``mixing="query-block"`` pools that estimate once per query block, from the block's mean query
  (:func:`block_tail_lse`, a product of the router's size), and the row's own term q . w / sqrt(D) moves it
  per row.
"""

from __future__ import annotations

import math
import os

import torch

from ..config import LINEAR_KEYS
from . import sla2_triton_forward as forward_kernels

__all__ = ["LINEAR_KEYS", "MIXINGS", "check_linear_keys", "check_mixing", "signed_weights", "signed_weight_grad",
           "tail_lse"]

MIXINGS = ("head", "query", "query-linear", "query-block")
"""How alpha is resolved: one per head, one per query row from the selected and unselected mass, one per query
row from the query alone (its logits formed by the Q pre-pass, the kernels read them per row), or one per query
row from both, the unselected mass pooled per query block (the kernels read it per row as they read the tail
log-sum-exp)."""

# Launch of tail_lse_kernel: key blocks per MMA step, warps and stages.  At (1, 12, 32760, 128), 97% on an H100
# (benchmarks/bench_tail_lse.py) 64 blocks at 4 warps and 3 stages took 0.29 ms, at the sparse loop's 8 warps
# 0.33; 128 blocks per step at 4 warps 0.25, but they spill registers in the 16-bit frame.
TAIL_CHUNK = 64
TAIL_WARPS = 4
TAIL_STAGES = 3


def check_mixing(mixing: str) -> None:
    """Raise ``ValueError`` unless ``mixing`` is one of :data:`MIXINGS`."""
    if mixing not in MIXINGS:
        raise ValueError(f"mixing must be one of {MIXINGS}, got {mixing!r}")


def check_linear_keys(linear_keys: str) -> None:
    """Raise ``ValueError`` unless ``linear_keys`` is one of :data:`LINEAR_KEYS`."""
    if linear_keys not in LINEAR_KEYS:
        raise ValueError(f"linear_keys must be one of {LINEAR_KEYS}, got {linear_keys!r}")


def signed_weights(weight: torch.Tensor, heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Hedgehog weights (H, D, D/2) -> the kernels' signed stack ``[W, -W]`` (H, D, D), contiguous in
    ``dtype``; differentiable, so the stack's gradient reaches ``weight``."""
    if tuple(weight.shape) != (heads, head_dim, head_dim // 2):
        raise ValueError(f"hedgehog feature weights must be (H, D, D/2) = ({heads}, {head_dim}, {head_dim // 2}), "
                         f"got {tuple(weight.shape)}")
    return torch.cat([weight, -weight], dim=-1).to(dtype).contiguous()


def signed_weight_grad(x: torch.Tensor, dlogits: torch.Tensor) -> torch.Tensor:
    """The signed stack's gradient sum_b x^T dlogits (H, D, D), fp32, from the gradient of the stacked logits
    ``x [W, -W]`` (``dlogits`` (B, H, N, D), contiguous).  ``x`` is a (B, H, N, D) view of a user tensor:
    one batched GEMM per batch entry reads it through its strides (a (B, H) batch of a (B, N, H, D) tensor
    does not flatten, and torch.matmul would copy it)."""
    return sum(torch.bmm(x[b].transpose(1, 2), dlogits[b]).float() for b in range(x.shape[0]))


def selection_table(lut: torch.Tensor, nk: int) -> torch.Tensor:
    """The LUT (B, H, nq, n_sel) as a (B*H*nq, nk) int8 table, 1 where a query block selected the key block: what
    the tail launches read to skip the selected blocks."""
    n_sel = lut.shape[-1]
    rows = lut.numel() // n_sel
    selected = torch.zeros(rows, nk, device=lut.device, dtype=torch.int8)
    return selected.scatter_(1, lut.reshape(rows, n_sel).long(), 1)


def tail_lse(q, q_strides, k_mean, k_sum, lut, n: int, heads: int, block_q: int, block_k: int, qk_scale: float,
             tile_m: int, shifted: bool, launch_options: dict | None = None, chunk: int = TAIL_CHUNK) -> torch.Tensor:
    """LSE_tail per query row (B*H, N) fp32 in log2 units: over the key blocks each row's query block did
    not select, log2-sum-exp of q . kbar_j log2(e)/sqrt(D) + log2 n_j (``k_mean`` (B*H, nk, D) the block
    means, ``k_sum`` (B*H, D) the token sums of K, ``lut`` (B, H, nq, n_sel)); -inf where every block is
    selected.  ``shifted``: in the low-bit sparse loop's frame (logits of K - mean(K)) instead.  ``tile_m``
    query rows (at most block_q, a divisor of it), ``chunk`` key blocks per MMA step and ``launch_options``
    (``num_warps``, ``num_stages``; default :data:`TAIL_WARPS`, :data:`TAIL_STAGES`): launch settings only."""
    if launch_options is None:
        launch_options = dict(num_warps=TAIL_WARPS, num_stages=TAIL_STAGES)
    bh, nk, d = k_mean.shape
    nq = lut.shape[-2]
    selected = selection_table(lut, nk)
    lse_tail = torch.empty(bh, n, device=q.device, dtype=torch.float32)
    # every tile reads all block means: in Q's dtype that traffic halves, and they are MMA operands anyway.
    # Centred first: keys often share a large mean, which 16 bits would round coarsely (bf16: 0.016 near 2)
    # and the logits would then cancel; the mean's own term is added back in fp32 where it is wanted
    k_centred = (k_mean - (k_sum / n).unsqueeze(1)).to(q.dtype)
    forward_kernels.tail_lse_kernel[(-(-n // tile_m), bh)](
        q, k_centred, selected, k_sum, lse_tail, *q_strides, n, heads, nq,
        nk, block_q, block_k, qk_scale, 1.0 / n,
        D=d, BLOCK_M=tile_m, CHUNK=chunk, SHIFTED=shifted, **launch_options,
    )
    return lse_tail


BLOCK_TAIL_GROUP = 16
"""Query blocks per program of ``block_tail_lse_kernel``: they share each chunk of key-block means (the
tensor-core minimum of 16 rows).  One query block per program read the means 16 times as often: 0.15 ms at
(1, 12, 32760, 128) on an H100, slower than the ~20 torch operations it replaced (0.08 ms)."""
BLOCK_TAIL_CHUNK = 64
"""Key blocks per step of ``block_tail_lse_kernel``."""


def block_tail_lse(q_mean: torch.Tensor, k_mean: torch.Tensor, lut: torch.Tensor, row_logits: torch.Tensor, n: int,
                   block_q: int, block_k: int, qk_scale: float, one_launch: bool) -> torch.Tensor:
    """What the sparse launch reads per row for ``mixing="query-block"`` (B*H, N) fp32 in log2 units: LSE_pool
    - ``row_logits`` log2(e), LSE_pool being :func:`tail_lse`'s estimate with every row of a query block taking
    the block's mean query ``q_mean`` (B*H, nq, D) fp32: over the key blocks the block did not select,
    log2-sum-exp of qbar . kbar_j log2(e)/sqrt(D) + log2 n_j (``k_mean`` (B*H, nk, D) fp32, ``lut`` (B, H, nq,
    n_sel)); -inf where every block is selected.  ``row_logits`` (B*H, N): each row's q . w / sqrt(D), which in
    the low-bit modes also carries the frame shift q . mean(K) / sqrt(D).  ``one_launch``
    (``LaunchConfig.block_tail_launch``): ``block_tail_lse_kernel`` after the LUT's selection table; otherwise
    torch operations (a batched product of the block means and a masked log-sum-exp)."""
    bh, nk, d = k_mean.shape
    nq, n_sel = lut.shape[-2:]
    if not one_launch:
        counts = (n - block_k * torch.arange(nk, device=k_mean.device)).clamp(max=block_k).float()
        logits = torch.baddbmm(counts.log2().expand(bh, nq, nk), q_mean, k_mean.transpose(1, 2), alpha=qk_scale)
        logits.view(bh * nq, nk).scatter_(1, lut.reshape(bh * nq, n_sel).long(), float("-inf"))
        lse_pool = torch.logsumexp(logits * math.log(2.0), dim=-1) / math.log(2.0)
        return lse_pool.repeat_interleave(block_q, dim=1)[:, :n] - row_logits / math.log(2.0)
    selected = selection_table(lut, nk)
    out = torch.empty(bh, n, device=q_mean.device, dtype=torch.float32)
    forward_kernels.block_tail_lse_kernel[(-(-nq // BLOCK_TAIL_GROUP), bh)](
        q_mean, k_mean, selected, row_logits, out, n, nq, nk, block_k, qk_scale,
        D=d, BLOCK_Q=block_q, GROUP=BLOCK_TAIL_GROUP, CHUNK=BLOCK_TAIL_CHUNK,
        **({} if os.environ.get("TRITON_INTERPRET") == "1" else {"num_warps": 4, "num_stages": 2}),
    )
    return out
