"""``slaconv bench``: SLA2 attention against dense SDPA on the local GPU (a quick table).

The full benchmark suite, with backward passes, model forwards and memory, is
``benchmarks/bench_attention.py``; this verb is the quick check a user runs on their own card.
"""

from __future__ import annotations

import torch

from .errors import InputError
from .kernels.ops import sla2_attention


def _time_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def bench_attention(*, seq_len: int, heads: int, head_dim: int, topks, quants, batch: int = 1) -> list[dict]:
    if not torch.cuda.is_available():
        raise InputError("slaconv bench needs a CUDA GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    q, k, v = (torch.randn(batch, seq_len, heads, head_dim, device=dev, dtype=torch.bfloat16) for _ in range(3))
    eye = torch.eye(head_dim, device=dev).expand(heads, head_dim, head_dim).contiguous()
    alpha = torch.zeros(heads, device=dev)
    flops = 4 * batch * heads * seq_len**2 * head_dim
    rows = []
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel(backend):
            ms = _time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt))
        rows.append({"op": name, "topk": 1.0, "ms": ms, "tflops": flops / ms / 1e9})
    base = rows[0]["ms"]
    for topk in topks:
        for quant in quants:
            ms = _time_ms(lambda: sla2_attention(q, k, v, eye, eye, alpha, topk=topk, quant=quant,  # noqa: B023
                                                 layout="bnhd"))
            rows.append({"op": f"sla2-{quant}", "topk": topk, "ms": ms, "tflops": flops / ms / 1e9})
    for r in rows:
        r["speedup_vs_cudnn"] = base / r["ms"]
    return rows


def render_table(rows: list[dict]) -> str:
    lines = [f"{'op':<16} {'topk':>6} {'ms':>9} {'dense-eq TFLOPS':>16} {'x cuDNN':>8}"]
    for r in rows:
        lines.append(f"{r['op']:<16} {r['topk']:>6.2f} {r['ms']:>9.3f} {r['tflops']:>16.1f} {r['speedup_vs_cudnn']:>8.2f}")
    return "\n".join(lines)
